"""Hugging Face causal LMs under DeepSpeed ZeRO, and the per-sample loss.

Owns: loading the tokenizer and the model (from a local folder, or random-init from an inline
config) so that under ZeRO-3 the parameters are sharded while they are created, the attention
implementation choice, gradient checkpointing, DeepSpeed Ulysses sequence parallelism
(`enable_sequence_parallel`), and the per-sample losses (`per_sample_nll`, `packed_sample_nll`,
`sharded_sample_nll`, all on `token_nll`). Must not: build the engine or optimizer (irdro.engine),
or reweight.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from irdro import dist
from irdro.config import ConfigError, ModelConfig, zero_stage
from irdro.paths import require_local

log = logging.getLogger(__name__)

# transformers reads the ZeRO-3 settings through a weakref to this object; it must stay alive for
# as long as models may be created or resized.
_HF_DS_CONFIG: object | None = None

# The one dtype table: `model.dtype` / `--dtype` name -> torch/transformers name -> torch dtype.
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16"}
DTYPES = {name: getattr(torch, torch_name) for name, torch_name in DTYPE_NAMES.items()}


def resolve_attention(choice: str, dtype: str) -> str:
    """The attention implementation to build the model with.

    `auto` = flash_attention_2 when flash-attn and CUDA are present and the model is bf16 (flash
    kernels reject fp32: a `zero3_fp32` run on a CUDA box with flash-attn would crash at its first
    forward), else sdpa. An explicit flash_attention_2 needs all three.

    Args:
        choice: `model.attention`.
        dtype: `model.dtype` ("fp32" or "bf16").
    """
    has_flash = importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()
    if choice == "auto":
        return "flash_attention_2" if has_flash and dtype != "fp32" else "sdpa"
    if choice == "flash_attention_2" and dtype == "fp32":
        raise ConfigError(
            "model.attention: flash_attention_2 needs model.dtype bf16 (flash kernels reject fp32); use sdpa"
        )
    if choice == "flash_attention_2" and not has_flash:
        raise ConfigError(
            "model.attention: flash_attention_2 needs CUDA and `pip install irdro[gpu]`; use auto or sdpa"
        )
    return choice


def load_tokenizer(cfg: ModelConfig):
    """The recipe's tokenizer (a local folder; nothing is downloaded, see irdro.paths).

    Raises:
        ConfigError: the folder is missing (naming the command that makes it) or holds no tokenizer.
    """
    from transformers import AutoTokenizer

    key, value = ("model.tokenizer", cfg.tokenizer) if cfg.tokenizer is not None else ("model.path", cfg.path)
    assert value is not None  # config.validate guarantees it
    path = str(require_local(key, value))
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: cannot load a tokenizer from {path}: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    """transformers' messages run over several lines; an irdro error is one."""
    return next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)


def load_model(cfg: ModelConfig, ds_config: dict):
    """The causal LM, sharded at creation when `ds_config` is ZeRO-3.

    Args:
        cfg: the recipe's model section.
        ds_config: the resolved DeepSpeed JSON (engine settings decide ZeRO-3).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    global _HF_DS_CONFIG
    if zero_stage(ds_config) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        # What zero.Init needs to create sharded full-size parameters. Not the batch size: it builds a
        # DeepSpeedConfig without DeepSpeed's model-parallel unit and would check train_batch_size
        # against the whole world, not the DP ranks. Not AutoTP: it slices the loaded, complete model
        # in deepspeed.initialize, and transformers refuses its checkpoint key conversions under it.
        _HF_DS_CONFIG = HfDeepSpeedConfig(
            {k: v for k, v in ds_config.items() if k not in ("train_batch_size", "tensor_parallel")}
        )
    else:
        _HF_DS_CONFIG = None
    dtype = DTYPES[cfg.dtype]
    attn = resolve_attention(cfg.attention, cfg.dtype)
    if cfg.path is not None:
        path = require_local("model.path", cfg.path)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(path),
                dtype=dtype,
                attn_implementation=attn,
                trust_remote_code=cfg.trust_remote_code,
                local_files_only=True,
            )
        except OSError as e:  # no config.json / weights in the folder
            raise ConfigError(f"model.path: cannot load a model from {path}: {_first_line(e)}") from None
    else:
        inline = dict(cfg.config or {})
        model_type = inline.pop("model_type")
        try:
            hf_config = AutoConfig.for_model(model_type, **inline)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model.config: {e}") from None
        model = AutoModelForCausalLM.from_config(
            hf_config,
            dtype=dtype,
            attn_implementation=attn,
            trust_remote_code=cfg.trust_remote_code,
        )
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    log.info("model: %s, attention %s, dtype %s", type(model).__name__, attn, cfg.dtype)
    return model


def enable_sequence_parallel(model, sequence_parallel: int, micro_batch_size: int):
    """Route the model's attention through DeepSpeed Ulysses over `sequence_parallel` ranks; returns
    the mpu to hand to `deepspeed.initialize` (None when `sequence_parallel` is 1). Call on every
    rank, once per process, after `irdro.dist.init_groups` and before the engine.

    Ulysses replaces the model's attention implementation (sdpa or flash_attention_2) process-wide:
    each rank holds T/N tokens of every row, all-to-alls them into T tokens of H/N heads around the
    core attention, and discards attention masks (causal over the gathered row, position ids
    gathered from the shards). Its groups are checked against irdro.dist's.

    Raises:
        ConfigError: Ulysses refuses the model (heads not divisible, eager attention).
    """
    if sequence_parallel == 1:
        return None
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    try:
        mpu = UlyssesSPAttentionHF.register_with_transformers(
            model_name_or_path=model,
            core_attn_implementation=attention_implementation(model),
            sequence_parallel_size=sequence_parallel,
            micro_batch_size=micro_batch_size,
            seq_length_is_variable=True,
        )
    except ValueError as e:
        raise ConfigError(f"parallel.sequence_parallel: {_first_line(e)}") from None
    dist.check_deepspeed_groups(mpu.get_sequence_parallel_group(), mpu.get_sequence_data_parallel_group())
    return mpu


# Logit elements up-cast to fp32 at once by `token_nll` (64 MB): a chunk of positions, never the
# whole [N, V]. Small enough to hide under any model's activations, large enough that the loop over
# chunks costs nothing next to the exp over them.
NLL_CHUNK_ELEMENTS = 1 << 24


class _TokenNLL(torch.autograd.Function):
    """Next-token NLL per position that keeps nothing of size [N, V] but the logits themselves.

    A plain `F.cross_entropy(logits.float(), ..., reduction="none")` saves the fp32 log-softmax
    (a second [N, V]; a third for bf16 logits, whose fp32 copy it makes first) and in backward
    builds a dense gradient of that before the logits' own. Here forward computes the log-softmax
    chunk by chunk into one reused fp32 buffer and keeps only the target's entry; backward writes
    g * (softmax - onehot) chunk by chunk straight into the logits' gradient (fp32 logits) or
    through the reused buffer (bf16). Same values, same gradients up to fp32 rounding. Writing
    into existing memory matters on CPU as well: a fresh chunk-sized tensor per chunk costs its
    page faults every time.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        n, vocab = logits.shape
        step = max(1, NLL_CHUNK_ELEMENTS // vocab)
        safe = targets.clamp(min=0)[:, None]
        buf = torch.empty(min(step, n), vocab, dtype=torch.float32, device=logits.device)
        nll = torch.empty(n, dtype=torch.float32, device=logits.device)
        for s in range(0, n, step):
            logp = torch.log_softmax(logits[s : s + step], -1, dtype=torch.float32, out=buf[: min(step, n - s)])
            nll[s : s + step] = logp.gather(1, safe[s : s + step]).squeeze(1).neg_()
        ctx.save_for_backward(logits, targets)
        return nll.masked_fill_(targets == -100, 0.0)

    @staticmethod
    def backward(ctx, grad_nll: Tensor) -> tuple[Tensor, None]:
        logits, targets = ctx.saved_tensors
        n, vocab = logits.shape
        step = max(1, NLL_CHUNK_ELEMENTS // vocab)
        safe, g = targets.clamp(min=0)[:, None], grad_nll.float()[:, None]
        grad = torch.empty_like(logits)
        direct = logits.dtype == torch.float32
        buf = None if direct else torch.empty(min(step, n), vocab, dtype=torch.float32, device=logits.device)
        for s in range(0, n, step):
            out = grad[s : s + step] if direct else buf[: min(step, n - s)]
            p = torch.softmax(logits[s : s + step], -1, dtype=torch.float32, out=out)
            p.scatter_add_(1, safe[s : s + step], torch.full_like(p[:, :1], -1.0))
            p.mul_(g[s : s + step])
            if not direct:
                grad[s : s + step] = p
        # unsupervised positions get exactly 0 (g * softmax would be NaN for non-finite logits)
        return grad.index_fill_(0, torch.nonzero(targets == -100).squeeze(1), 0.0), None


def token_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """(N,) fp32 NLL of `targets` under `logits` (N, V), any float dtype; 0 where targets == -100.

    Equal to `F.cross_entropy(logits.float(), targets, reduction="none")` in value and gradient, at
    the memory of the logits alone (see `_TokenNLL`)."""
    return _TokenNLL.apply(logits, targets)


def per_sample_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Mean next-token NLL of each sample over its supervised tokens, in fp32.

    Supervised means `labels != -100` (never `!= pad_token_id`: with pad == eos that would drop real
    EOS targets). Labels are shifted instead of the logits (as in HF's own loss), so the logits go
    into `token_nll` as a view: nothing of size [B, T, V] is copied, in fp32 or bf16.

    Args:
        logits: (B, T, V) model outputs for positions 0..T-1.
        labels: (B, T) int64 targets aligned with the inputs (HF convention, unshifted), -100 where
            not supervised.

    Returns:
        losses: (B,) fp32 per-sample mean NLL (0 for a sample with no supervised token).
        counts: (B,) int64 supervised tokens per sample.
    """
    # targets[:, t] is what position t predicts; the last position predicts nothing.
    sums, counts = target_nll_sums(logits, F.pad(labels[:, 1:], (0, 1), value=-100))
    return sums / counts.clamp(min=1).to(torch.float32), counts


def target_nll_sums(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(B,) fp32 sums of the token NLL and (B,) int64 counts of the targets != -100 of each row.

    Args:
        logits: (B, T, V) model outputs.
        targets: (B, T) int64 target of each position (labels already shifted), -100 where none.
    """
    counts = (targets != -100).sum(dim=1)
    sums = token_nll(logits.flatten(0, 1), targets.flatten()).view(targets.shape).sum(dim=1)
    return sums, counts


def sharded_sample_nll(logits: Tensor, shift_labels: Tensor) -> tuple[Tensor, Tensor]:
    """`per_sample_nll` of rows split over the SP group (irdro.data.shard_sequence): this rank's
    sums and counts are added over the group, the sums differentiably (irdro.dist._SPSum), so
    every SP rank returns the same per-sample losses as one rank holding the whole rows. A sample
    with no supervised token on this shard is fine: the counts are global. Call on every rank.

    Args:
        logits: (B, T/N, V) outputs for this rank's shard.
        shift_labels: (B, T/N) int64 targets of the shard's positions, -100 where none.

    Returns:
        losses: (B,) fp32 per-sample mean NLL over the whole row, identical on every SP rank.
        counts: (B,) int64 supervised tokens of the whole row.
    """
    sums, counts = target_nll_sums(logits, shift_labels)
    counts = dist.sp_all_reduce_sum(counts)
    return dist.sp_sum_differentiable(sums) / counts.clamp(min=1).to(torch.float32), counts


# Attention implementations whose packed path is correct: a 4D block-diagonal mask for sdpa/eager,
# flash-attn varlen (cu_seqlens derived from restarting position ids) for the flash kernels.
PACKED_MASK_ATTENTION = ("sdpa", "eager")
PACKED_VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")


def attention_implementation(model) -> str:
    """The attention implementation a (DeepSpeed-wrapped) HF model actually runs."""
    module = getattr(model, "module", model)
    return str(module.config._attn_implementation)


def block_causal_mask(segment_ids: Tensor, attention: str, dtype: torch.dtype) -> Tensor:
    """(R, 1, T, T) mask letting token q see token k iff k <= q and both are in one segment.

    Padding (segment -1) forms one more segment, so no query row is fully masked (no NaN).
    transformers returns a 4D mask as-is (masking_utils: "already prepared"), so this is what
    attention sees.

    Args:
        segment_ids: (R, T) int64 segment index per token, -1 on padding.
        attention: "sdpa" (boolean mask, True = attend) or "eager" (additive: 0 or dtype min,
            added to the scores).
        dtype: the model's compute dtype (eager's additive mask).
    """
    t = segment_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal
    allowed = allowed[:, None]
    if attention == "sdpa":
        return allowed
    zero = torch.zeros((), dtype=dtype, device=segment_ids.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def packed_forward(model, batch: dict[str, Tensor], key: str = "data.packing") -> Tensor:
    """Logits of a packed batch (irdro.data.collate_packed) with attention kept per document.

    sdpa/eager get a 4D block-diagonal causal mask plus restarting position ids. flash-attn gets
    no mask: the rows are flattened into one (1, R*T) row whose restarting position ids make
    transformers call the varlen kernel with per-document cu_seqlens (every segment, padding
    included, starts at position 0). The flash branch needs CUDA and is not exercised by the CPU
    test suite.

    Args:
        model: the HF causal LM or the DeepSpeed engine wrapping it.
        batch: input_ids, position_ids, segment_ids, each (R, T).
        key: config key named in errors.

    Returns:
        (R, T, V) logits.

    Raises:
        ConfigError: an attention implementation for which packing cannot be made exact.
    """
    attention = attention_implementation(model)
    input_ids, position_ids = batch["input_ids"], batch["position_ids"]
    if attention in PACKED_VARLEN_ATTENTION:
        logits = model(input_ids=input_ids.reshape(1, -1), position_ids=position_ids.reshape(1, -1)).logits
        return logits.reshape(*input_ids.shape, -1)
    if attention not in PACKED_MASK_ATTENTION:
        raise ConfigError(
            f"{key}: boundary packing supports attention {', '.join(PACKED_MASK_ATTENTION + PACKED_VARLEN_ATTENTION)}, "
            f"but the model runs {attention!r}; set model.attention to sdpa or {key}=none"
        )
    module = getattr(model, "module", model)
    mask = block_causal_mask(batch["segment_ids"], attention, module.dtype)
    return model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).logits


def packed_sample_nll(logits: Tensor, labels: Tensor, segment_ids: Tensor, num_samples: int) -> tuple[Tensor, Tensor]:
    """Per-sample mean next-token NLL of packed rows, in fp32 (the packed `per_sample_nll`).

    Token t's target labels[t+1] counts for sample segment_ids[t+1] only if it is supervised and
    t is in the same segment (a segment's last token never predicts the next document). Per-token
    NLLs (`token_nll`, as in `per_sample_nll`: no copy of the logits) are scatter-added into one
    slot per sample; no host sync.

    Args:
        logits: (R, T, V) model outputs.
        labels: (R, T) int64 unshifted targets, -100 where not supervised.
        segment_ids: (R, T) int64 sample index in [0, num_samples) per token, -1 on padding.
        num_samples: B, the number of samples packed into the rows.

    Returns:
        losses: (B,) fp32 per-sample mean NLL (0 for a sample with no supervised token).
        counts: (B,) int64 supervised tokens per sample.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    seg = F.pad(segment_ids[:, 1:], (0, 1), value=-1)
    # token t's target counts only inside its own document: a segment's last token predicts nothing
    valid = (targets != -100) & (seg >= 0) & (segment_ids == seg)
    targets = torch.where(valid, targets, -100)
    slots = seg.clamp(min=0).flatten()  # unsupervised tokens add 0 to slot 0
    counts = torch.zeros(num_samples, dtype=torch.int64, device=logits.device)
    counts = counts.scatter_add(0, slots, valid.flatten().long())
    nll = token_nll(logits.flatten(0, 1), targets.flatten())
    sums = torch.zeros(num_samples, dtype=torch.float32, device=logits.device)
    sums = sums.scatter_add(0, slots, nll)
    return sums / counts.clamp(min=1).to(torch.float32), counts
