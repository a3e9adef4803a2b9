"""A transformers Trainer run with the cpu_offloading block: the two-line change is the `with` below.

A Llama built from a config (random weights, no download) learns a synthetic task (each sequence counts up
from a random start, modulo the vocabulary), so the loss falls. Run it as transformers' DeepSpeed examples run:

    deepspeed examples/train_hf_trainer.py --deepspeed_config configs/optimizer_50.json
    ds-offload launch examples/train_hf_trainer.py --deepspeed_config configs/optimizer_50.json
"""
import argparse
import json
import os

import torch


class CountingData(torch.utils.data.Dataset):
    def __init__(self, vocab, seq, n=256):
        self.vocab, self.seq, self.n = vocab, seq, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        start = torch.randint(0, self.vocab, (1,), generator=torch.Generator().manual_seed(i))
        ids = (start + torch.arange(self.seq)) % self.vocab
        return {"input_ids": ids, "labels": ids}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--deepspeed_config", "--deepspeed-config", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--output-dir", default="out/hf_trainer")
    p.add_argument("--resume", default=None, help="a checkpoint folder of an earlier run to resume from")
    p.add_argument("--save-steps", type=int, default=0, help="save a checkpoint every N steps (0: never)")
    p.add_argument("--losses-out", default=None, help="write the logged losses here (JSON)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1)
    args = p.parse_args(argv)
    if "RANK" not in os.environ:
        from ds_offload.single_process import ensure_single_process_env
        ensure_single_process_env()

    import ds_offload
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    with open(args.deepspeed_config) as fh:
        ds_config = json.load(fh)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    targs = TrainingArguments(output_dir=args.output_dir, per_device_train_batch_size=args.micro_batch,
                              max_steps=args.steps, learning_rate=1e-3, logging_steps=1, report_to=[],
                              save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
                              deepspeed=ds_config, seed=0, data_seed=0)
    trainer = Trainer(model=model, args=targs, train_dataset=CountingData(cfg.vocab_size, 32))
    with ds_offload.patch_deepspeed_initialize():  # the cpu_offloading block of ds_config now applies
        trainer.train(resume_from_checkpoint=args.resume)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if args.losses_out:
        with open(args.losses_out, "w") as fh:
            json.dump({"losses": losses, "offload": trainer.model_wrapped.ds_offload.summary()}, fh)
    trainer.model_wrapped.ds_offload.close()
    return losses


if __name__ == "__main__":
    main()
