"""
Memory per GPU, before the first step: the weights, their gradients and AdamW's state exactly (the real parameters'
sizes and dtypes, each sharded world_size ways under FSDP), what the mode adds (DDP's gradient buckets, autocast's
16-bit weight copies, FSDP's gathered blocks and its unsharded gradient accumulation, the diffusion EMA), and the
activations, estimated (docs/lm.md, "Memory per GPU"). It reads only the parameters' shapes and dtypes, so a model
built on the meta device will do: nothing is allocated. On a GPU, check_fits stops a run whose estimate does not fit
and names the flags that would make it fit.
"""

import dataclasses

import torch

GiB = 2 ** 30
# saved activations per token, layer and unit of width at 16 bits (Korthikanti et al. 2022, "Reducing Activation
# Recomputation in Large Transformer Models"; the attention's T x T term is left out: the GPU kernels are fused)
ACTIVATION_BYTES = 34
FIT = 0.9  # of the GPU's memory; the rest for CUDA's context and the allocator's fragmentation


@dataclasses.dataclass
class Plan:
    """What the estimate needs of a run: its micro-batch, the model's shape, precision and how it is spread."""
    batch_size: int  # sequences (or images) per micro-batch
    tokens: int  # per sequence (or image)
    layers: int
    width: int
    vocab: int = 0  # an LM's output classes (its logits are large); 0 for other models
    dtype: str = "float32"
    world_size: int = 1
    fsdp: bool = False
    grad_accum: int = 1  # micro-batches per step over all processes
    activation_checkpointing: bool = False
    ema: bool = False  # a float32 copy of the model (the diffusion trainer's)


@dataclasses.dataclass
class Estimate:
    """Bytes per GPU: weights, gradients and optimizer exact; extra (what the mode adds) and activations estimated."""
    weights: int
    gradients: int
    optimizer: int
    extra: dict
    activations: int

    @property
    def total(self):
        return self.weights + self.gradients + self.optimizer + sum(self.extra.values()) + self.activations

    def describe(self):
        """'about X GiB (weights ..., activations ~...)'"""
        parts = [f"weights {size(self.weights)}", f"gradients {size(self.gradients)}",
                 f"AdamW state {size(self.optimizer)}"] + [f"{k} {size(v)}" for k, v in self.extra.items()]
        return f"about {size(self.total)} ({', '.join(parts)}, activations ~{size(self.activations)})"


def blocks_of(model):
    """A model's transformer blocks, each an FSDP unit: a Cogformer's blocks; a U-ViC's in-blocks, mid-block and
    out-blocks."""
    if hasattr(model, "blocks"):
        return list(model.blocks)
    return [*model.in_blocks, model.mid_block, *model.out_blocks]


def plan_of(model, config, world_size=1, fsdp=False):
    """The Plan of a trainer's run: config (its TrainConfig) training model (a Cogformer or a U-ViC)."""
    c, common = model.config, dict(dtype=config.dtype, world_size=world_size, fsdp=fsdp, grad_accum=config.grad_accum,
                                   activation_checkpointing=config.activation_checkpointing)
    if hasattr(model, "blocks"):  # an LM: block_size tokens per sequence, and its logits
        return Plan(config.batch_size, c.block_size, c.n_layer, c.n_embd, c.vocab_size, **common)
    tokens = (c.img_size // c.patch_size) ** 2 + 1 + c.num_clip_token  # the patches, the time token, the caption's
    return Plan(config.batch_size, tokens, c.depth, c.embed_dim, **common, ema=True)


def size(n):
    return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / 2 ** 20:.1f} MiB"


def shard_numel(p, shards):
    """Elements of p on one process when FSDP splits its first dim in `shards` chunks (the first, largest one)."""
    if shards == 1 or p.dim() == 0:
        return p.numel()
    rows = p.shape[0]
    return -(-rows // shards) * (p.numel() // rows) if rows else 0


def estimate_memory(model, plan):
    """The Estimate for model (its parameters' shapes and dtypes; the meta device will do) trained as plan says."""
    params, blocks = list(model.parameters()), blocks_of(model)  # blocks: FSDP's units
    shards = plan.world_size if plan.fsdp else 1
    weights = sum(shard_numel(p, shards) * p.element_size() for p in params)
    optimizer = sum(2 * shard_numel(p, shards) * p.element_size() + 4 for p in params)  # exp_avg, exp_avg_sq, step
    whole = sum(p.numel() * p.element_size() for p in params)
    sixteen = plan.dtype in ("bfloat16", "float16")
    extra = {}
    if plan.fsdp:
        # the block at work, the next one (prefetched) and one block's gradient before its reduce-scatter, and the
        # root's own weights and gradients (kept gathered from the forward to the end of the backward), in bf16 or fp32
        gathered = 2 if plan.dtype == "bfloat16" else 4
        largest = max((sum(p.numel() for p in block.parameters()) for block in blocks), default=0)
        in_blocks = {id(p) for block in blocks for p in block.parameters()}
        root = sum(p.numel() for p in params if id(p) not in in_blocks)
        extra["FSDP's gathered blocks"] = (3 * largest + 2 * root) * gathered
        if plan.grad_accum // plan.world_size > 1:  # gradients kept whole, in fp32, until the step's last micro-batch
            extra["unsharded gradient accumulation"] = sum(p.numel() for p in params) * 4
    else:
        if plan.world_size > 1:
            extra["DDP's gradient buckets"] = whole
        if sixteen:  # autocast keeps a 16-bit copy of each matrix from the forward to the backward
            extra["autocast's 16-bit weights"] = 2 * sum(p.numel() for p in params if p.dim() >= 2)
    if plan.ema:
        extra["EMA model"] = sum(p.numel() * 4 for p in params)
    return Estimate(weights, weights, optimizer, extra, activation_memory(plan))


def activation_memory(plan):
    """Saved activations: 34 bytes per token, layer and unit of width at 16 bits (twice at 32); with activation
    checkpointing each block's input (the residual stream: bf16 under FSDP's bf16 weights, else fp32) and one block's
    activations while it is recomputed. An LM adds its logits: 16-bit logits, the fp32 log-softmax the loss keeps and
    its gradient."""
    sixteen = plan.dtype in ("bfloat16", "float16")
    act = 2 if sixteen else 4
    per_token = plan.batch_size * plan.tokens
    block = ACTIVATION_BYTES * act // 2 * per_token * plan.width
    if plan.activation_checkpointing:
        residual = 2 if plan.fsdp and plan.dtype == "bfloat16" else 4
        blocks = plan.layers * per_token * plan.width * residual + block
    else:
        blocks = plan.layers * block
    return blocks + per_token * plan.vocab * (act + 8)


def device_memory(device):
    """The GPU's memory in bytes, or None where there is no GPU to compare with."""
    if not str(device).startswith("cuda"):
        return None
    return torch.cuda.get_device_properties(torch.device(device)).total_memory


def ways_to_fit(model, plan, budget, resuming):
    """The flags with which the estimate would fit in budget bytes, each with its estimate: activation checkpointing,
    FSDP over the fewest GPUs that do it, a smaller micro-batch with more of them (not for a resumed run, which keeps
    its batch), and, when no single change does, them together."""
    def fits(**changes):
        total = estimate_memory(model, dataclasses.replace(plan, **changes)).total
        return total if total <= budget else None

    def fsdp_over(**changes):  # FSDP over this run's processes, or the fewest GPUs (dividing grad_accum) that fit
        counts = [plan.world_size] if plan.world_size > 1 and not plan.fsdp else []
        counts += [n for n in (2, 4, 8, 16, 32, 64) if n > plan.world_size or not plan.fsdp]
        for n in counts:
            if plan.grad_accum % n == 0 and (total := fits(fsdp=True, world_size=n, **changes)):
                return (f"--fsdp over these {n} processes" if n == plan.world_size else
                        f"--fsdp on {n} GPUs under torchrun"), total
        return None

    def smaller_batch(**changes):
        for k in (2, 4, 8, 16, 32, 64):
            if plan.batch_size % k == 0 and (total := fits(batch_size=plan.batch_size // k,
                                                           grad_accum=plan.grad_accum * k, **changes)):
                return f"--batch_size={plan.batch_size // k} --grad_accum={plan.grad_accum * k}", total
        return None

    ways = []
    if not plan.activation_checkpointing and (total := fits(activation_checkpointing=True)):
        ways.append(("--activation_checkpointing", total))
    ways += [way for way in (fsdp_over(), None if resuming else smaller_batch()) if way]
    if not ways:
        ac = {"activation_checkpointing": True}
        way = fsdp_over(**ac) or (None if resuming else smaller_batch(**ac))
        if way:
            ways.append((f"--activation_checkpointing and {way[0]}", way[1]))
    return [f"{flags} ({size(total)})" for flags, total in ways]


def check_fits(model, plan, device, resuming=False):
    """On a GPU: stop before anything is allocated when the estimate exceeds FIT of its memory, naming the ways to
    fit (ways_to_fit). Every rank makes the same estimate, so all stop together."""
    memory = device_memory(device)
    estimate = estimate_memory(model, plan)
    if memory is None or estimate.total <= FIT * memory:
        return
    ways = ways_to_fit(model, plan, FIT * memory, resuming)
    fix = f"it would fit with {', or '.join(ways)}" if ways else "none of --fsdp, --activation_checkpointing or a " \
        "smaller --batch_size makes it fit: a smaller model, or GPUs with more memory"
    raise SystemExit(f"error: this run needs {estimate.describe()} per GPU by the estimate (docs/lm.md), more than "
                     f"{FIT:.0%} of this GPU's {size(memory)}: {fix}; --memory_check=false starts it anyway")
