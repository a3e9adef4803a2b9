"""The optimizer's state in and out of its pieces, always as whole parameters in torch.optim.AdamW's format.

Whole parameters, so a state dict loads under any fraction (or into plain AdamW, or from it); CPU tensors
only, so it saves and loads with ``torch.load(weights_only=True)``. Low-precision parameters carry their
fp32 ``master`` too; fp32 parameters are their own master.
"""
import torch


def gather_state(pieces_by_index, params_by_index):
    """Whole-parameter AdamW state (CPU tensors) from the pieces; the master only where it is not the param."""
    state = {}
    for idx, pieces in pieces_by_index.items():
        p = params_by_index[idx]
        m = torch.zeros(p.numel(), dtype=torch.float32)
        v = torch.zeros_like(m)
        master = torch.empty_like(m) if p.dtype != torch.float32 else None
        for pc in pieces:
            m[pc.start:pc.end].copy_(pc.exp_avg)
            v[pc.start:pc.end].copy_(pc.exp_avg_sq)
            if master is not None:
                master[pc.start:pc.end].copy_(pc.master)
        # An int step: torch's Adam(W) and DeepSpeed's FusedAdam/CPUAdam all load it (FusedAdam adds to it).
        entry = {"step": int(pieces[0].steps_taken()), "exp_avg": m.view(p.shape),
                 "exp_avg_sq": v.view(p.shape)}
        if master is not None:
            entry["master"] = master.view(p.shape)
        state[idx] = entry
    return state


def scatter_state(pieces_by_index, state):
    """Load whole-parameter AdamW state into the pieces; parameters absent from ``state`` start fresh."""
    for idx, pieces in pieces_by_index.items():
        entry = state.get(idx)
        for pc in pieces:
            if entry is None:
                pc.exp_avg.zero_()
                pc.exp_avg_sq.zero_()
                pc.set_steps(0)
                continue
            pc.exp_avg.copy_(entry["exp_avg"].reshape(-1)[pc.start:pc.end])
            pc.exp_avg_sq.copy_(entry["exp_avg_sq"].reshape(-1)[pc.start:pc.end])
            pc.set_steps(float(entry.get("step", 0)))
            if pc.param.dtype != torch.float32:  # fp32 params are their own master
                master = entry.get("master")
                pc.master.copy_(pc.param_view() if master is None else master.reshape(-1)[pc.start:pc.end])
