"""One offloaded layer's host buffers and per-step state, and what its forward saves in place of a weight."""


def clip_runs(runs, a, b):
    """The CPU Adam runs `runs` (from `OffloadedLayer.runs`) cut to the elements [a, b)."""
    return [(max(a, s), min(b, e), *h) for s, e, *h in runs if s < b and a < e]


class SavedWeight:
    """What the forward saved instead of a weight: where to find it again in backward."""
    __slots__ = ("layer", "size", "stride", "offset")

    def __init__(self, layer, t):
        self.layer, self.size, self.stride, self.offset = layer, t.size(), t.stride(), t.storage_offset()


class SavedOuter:
    """A tensor packed by the saved-tensor hooks that were active outside ours (activation offload)."""
    __slots__ = ("packed", "unpack")

    def __init__(self, packed, unpack):
        self.packed, self.unpack = packed, unpack


class OffloadedLayer:
    """One offloaded layer's buffers and its state within a step."""

    def __init__(self, index, module, params, groups):
        self.index = index  # index => position among the offloaded layers, in forward order
        self.module = module
        self.params = params  # params => its trainable parameters, in module.parameters() order
        self.offsets, off = [], 0  # offsets => each param's start in the layer's flat buffers
        for p in params:
            self.offsets.append(off)
            off += p.numel()
        self.numel = off
        # spans => [(start, end, param group index)]: contiguous runs of one optimizer param group
        self.spans = []
        for p, o, g in zip(params, self.offsets, groups):
            if self.spans and self.spans[-1][2] == g and self.spans[-1][1] == o:
                self.spans[-1] = (self.spans[-1][0], o + p.numel(), g)
            else:
                self.spans.append((o, o + p.numel(), g))
        self.working = self.master = self.grad = self.exp_avg = self.exp_avg_sq = self.staging = None
        self.bucket_id = None  # bucket_id => its id in the CPU Adam backend
        self.step = 0  # step => Adam steps taken (overflow-skipped steps are not)
        self.device_copy = None  # device_copy => flat copy on the GPU while in use, None between uses
        self.fetched = None  # fetched => CUDA event after device_copy's copy from the host
        self.arrived = set()  # arrived => ids of params whose gradient this backward delivered
        self.accumulated = False  # accumulated => `grad` holds a gradient of this accumulation window
        self.grad_future = None  # grad_future => the worker's accumulation of the last gradient copy
        self.sq = 0.0  # sq => squared L2 norm of the accumulated gradient, taken on the host at the boundary
        self.gpu_sq = None  # gpu_sq => the same on the device, when the window has a single micro-step
        self.adding = False  # adding => this backward's gradients go to `staging`, then are added to `grad`
        self.boundary = False  # boundary => this backward ends the accumulation window
        self.d2h_event = None  # d2h_event => CUDA event after this window's copies, when no worker task waits on it
        self.update_keys = []  # update_keys => this layer's chunks in TailSteps.pending after a step

    def views(self, flat):
        return [flat[o:o + p.numel()].view(p.shape) for p, o in zip(self.params, self.offsets)]

    def point_params_at(self, flat):
        for p, v in zip(self.params, self.views(flat)):
            p.data = v

    def runs(self, param_groups):
        """Its CPU Adam runs over all its elements for its next step: (a, b, step_before, lr, b1, b2, eps, wd)."""
        def hyper(g):
            g = param_groups[g]
            return (self.step, float(g["lr"]), float(g["betas"][0]), float(g["betas"][1]), float(g["eps"]),
                    float(g["weight_decay"]))
        return [(s, e, *hyper(g)) for s, e, g in self.spans]

    def state(self):
        return {"master": self.master.clone(), "exp_avg": self.exp_avg.clone(), "exp_avg_sq": self.exp_avg_sq.clone(),
                "step": self.step}

    def load_state(self, s):
        for key in ("master", "exp_avg", "exp_avg_sq"):
            getattr(self, key).copy_(s[key])
        self.step = int(s["step"])
        if self.working is not self.master:
            self.working.copy_(self.master)
