"""What weight offload will take, checked before DeepSpeed's engine (and any GPU memory) exists.

Why before: a shared parameter or a CPU memory shortfall found after the engine was built would leave a
half-moved model; here each is one clear error naming the key, with the numbers.
"""
from ..errors import ConfigError

KEY = "cpu_offloading.model.cpu_offloading_weights"
# Host bytes per offloaded element: fp32 master, gradient accumulator, two moments, and the working copy
# (none for fp32 models, whose master is the working copy); an fp32 staging buffer with accumulation.
HOST_BYTES = 16


def _group_index(p, groups):
    for i, g in enumerate(groups):
        if any(q is p for q in g["params"]):
            return i
    return 0


class WeightPlan:
    """The offloaded layers' trainable parameters, their optimizer param group, and the checks."""

    def __init__(self, layers, model, model_parameters=None, client_optimizer=None):
        if client_optimizer is not None:
            groups = client_optimizer.param_groups
        elif model_parameters is not None and model_parameters and isinstance(model_parameters[0], dict):
            groups = model_parameters
        else:
            groups = [{"params": []}]
        self.layers = []  # layers => [(module, trainable params, their group indices)] in forward order
        owner = {}  # owner => id(param) => index of the offloaded layer that holds it
        problems = []
        for i, layer in enumerate(layers):
            params = [p for p in layer.parameters() if p.requires_grad]
            for p in params:
                if id(p) in owner:
                    problems.append((KEY, f"a parameter of offloaded layer {i} is shared with offloaded layer "
                                          f"{owner[id(p)]}. Fix: offload only layers that own their parameters."))
                owner[id(p)] = i
            self.layers.append((layer, params, [_group_index(p, groups) for p in params]))
        self.param_ids = set(owner)
        inside = {id(m) for layer in layers for m in layer.modules()}
        for name, m in model.named_modules(remove_duplicate=False):
            if id(m) in inside:
                continue
            for pname, p in m._parameters.items():
                if p is not None and id(p) in owner:
                    problems.append((KEY, f"parameter '{name + '.' if name else ''}{pname}' outside the offloaded "
                                          f"layers is the same tensor as one of offloaded layer {owner[id(p)]} (tied "
                                          "weights): between uses it lives in CPU memory, which would break that "
                                          "module. Fix: untie it, or lower cpu_offloading_num_layers so that layer "
                                          "stays on the GPU."))
        if not owner:
            problems.append((KEY, "the offloaded layers have no trainable parameter. Fix: check "
                                  "cpu_offloading_num_layers and which parameters require grad."))
        if problems:
            raise ConfigError(problems)
        self.numel = sum(p.numel() for _, ps, _ in self.layers for p in ps)

    def _kept(self, i, params):
        kept = [p for p in params if id(p) not in self.param_ids]
        if params and not kept:
            raise ConfigError([(KEY, f"param group {i} holds only parameters of the offloaded layers, and DeepSpeed "
                                     "cannot build an optimizer group without parameters. Fix: put those parameters "
                                     "in a group with others, or offload fewer layers.")])
        return kept

    def keep(self, params):
        """`params` (tensors or param-group dicts) without the offloaded ones."""
        params = list(params)
        if params and isinstance(params[0], dict):
            return [{**g, "params": self._kept(i, list(g["params"]))} for i, g in enumerate(params)]
        return [p for p in params if id(p) not in self.param_ids]

    def strip_client_optimizer(self, optimizer):
        """Remove the offloaded parameters from a client torch optimizer's groups (and any state of them)."""
        for i, g in enumerate(optimizer.param_groups):
            g["params"] = self._kept(i, list(g["params"]))
        for p in list(optimizer.state):
            if id(p) in self.param_ids:
                del optimizer.state[p]

    def host_bytes(self, model_dtype_bytes=2, accumulating=False):
        per = HOST_BYTES + (model_dtype_bytes if model_dtype_bytes != 4 else 0) + (4 if accumulating else 0)
        return per * self.numel


def available_host_bytes():
    """MemAvailable of /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_host_memory(needed, available=None):
    """One error with both figures when the CPU memory the offload needs is not there."""
    available = available_host_bytes() if available is None else available
    if available is not None and needed > available:
        raise ConfigError([(KEY, f"the offload needs {needed / 2**30:.1f} GiB of CPU memory (weights' fp32 masters, "
                                 "moments, gradients and working copies, plus the optimizer's offloaded share) and "
                                 f"{available / 2**30:.1f} GiB are available. Fix: offload fewer layers "
                                 "(cpu_offloading_num_layers), a smaller optimizer_offload_fraction, or free memory.")])
