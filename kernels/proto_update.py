"""The fused prototype EMA update (docs/method.md §4): loader and wrappers of the compiled op.

The ops live in `confeti_fast._C` (schemas + CPU kernels) and `confeti_fast._C_cuda` (CUDA
kernels, built when CUDA is). Importing this module never raises: when the extension is
missing, `AVAILABLE` is False and `LOAD_ERROR` says why.

    torch.ops.confeti_fast.proto_ema_update_(prototypes, counts, feats, cam, labels, valid,
                                              momentum, top_k) -> ()         # in place
    torch.ops.confeti_fast.proto_select(cam, labels, valid, num_classes, top_k)
        -> (indices (K, top_k) int64, -1 padded, best first; candidates (K,) int64)
    torch.ops.confeti_fast.proto_class_stats(feats, cam, labels, valid, num_classes, top_k)
        -> (weighted_sum (K, D) float32, weight_sum (K,) float32, kept (K,) int64)
    torch.ops.confeti_fast.proto_ema_apply_(prototypes, counts, weighted_sum, weight_sum, kept,
                                             momentum) -> ()                 # in place
"""
import torch

AVAILABLE = False        # confeti_fast._C loaded: the schemas and the CPU kernels
CUDA_AVAILABLE = False   # confeti_fast._C_cuda loaded too (says nothing about a GPU being present)
LOAD_ERROR = None        # why _C did not load
CUDA_LOAD_ERROR = None   # why _C_cuda did not load


def _short(exc):
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]


try:
    from .. import _C  # noqa: F401  (registers the schemas and the CPU kernels)
    AVAILABLE = True
except Exception as exc:  # missing or stale build, ABI mismatch
    LOAD_ERROR = _short(exc)

if AVAILABLE:
    try:
        from .. import _C_cuda  # noqa: F401  (registers the CUDA kernels)
        CUDA_AVAILABLE = True
    except Exception as exc:  # not built, or no CUDA runtime on this machine
        CUDA_LOAD_ERROR = _short(exc)

    def _proto_ema_update_fake(prototypes, counts, feats, cam, labels, valid, momentum, top_k):
        return None

    def _proto_select_fake(cam, labels, valid, num_classes, top_k):
        return (labels.new_empty((num_classes, top_k), dtype=torch.int64),
                labels.new_empty((num_classes,), dtype=torch.int64))

    def _proto_class_stats_fake(feats, cam, labels, valid, num_classes, top_k):
        return (feats.new_empty((num_classes, feats.shape[1]), dtype=torch.float32),
                feats.new_empty((num_classes,), dtype=torch.float32),
                labels.new_empty((num_classes,), dtype=torch.int64))

    def _proto_ema_apply_fake(prototypes, counts, weighted_sum, weight_sum, kept, momentum):
        return None

    # Fake (meta) kernels let torch.compile trace through the ops.
    for _name, _fake in (("proto_ema_update_", _proto_ema_update_fake), ("proto_select", _proto_select_fake),
                         ("proto_class_stats", _proto_class_stats_fake),
                         ("proto_ema_apply_", _proto_ema_apply_fake)):
        try:
            torch.library.register_fake(f"confeti_fast::{_name}", _fake)
        except RuntimeError as exc:  # already registered (module imported under a second name)
            if "already" not in str(exc):
                raise


def _as_inputs(labels, valid):
    if labels.dtype != torch.int64:
        labels = labels.long()
    if valid is not None and valid.dtype != torch.bool:
        valid = valid.bool()
    return labels, valid


def _num_classes(cam, num_classes, op):
    """`num_classes`, defaulting to the CAM's channel count (required when cam is None)."""
    if num_classes is not None:
        return int(num_classes)
    if cam is None:
        raise ValueError(f"{op}: num_classes is required when cam is None")
    return int(cam.shape[1])


def _require():
    if not AVAILABLE:
        raise RuntimeError(f"confeti_fast._C is not available ({LOAD_ERROR}); "
                           "build it with `pip install --no-build-isolation -e .`")


def proto_ema_update(prototypes, counts, feats, cam, labels, valid=None, momentum=0.999, top_k=32,
                     reduce=None):
    """Fused `confeti_fast.reference.proto_ema_update`: same arguments, same result.

    Updates `prototypes` (K, D) float32 and `counts` (K,) int64 in place and returns them.
    feats / cam: float32, bfloat16 or float16, any strides; cam None means weights 1.
    reduce: None (one fused op), or a callable that sums the per-class statistics across ranks
    in place, `reduce(weighted_sum, weight_sum, kept)` (see `proto_class_stats`), between the
    selection and the EMA; e.g. `lambda *t: [dist.all_reduce(x) for x in t]`. With an identity
    `reduce` the result is bitwise that of `reduce=None`.
    """
    _require()
    labels, valid = _as_inputs(labels, valid)
    with torch.no_grad():
        if reduce is None:
            torch.ops.confeti_fast.proto_ema_update_(prototypes, counts, feats, cam, labels, valid,
                                                     float(momentum), int(top_k))
            return prototypes, counts
        if feats.dim() == 4 and feats.shape[1] != prototypes.shape[-1]:
            raise RuntimeError(f"proto_ema_update: feats has {feats.shape[1]} channels but prototypes have "
                               f"D = {prototypes.shape[-1]}")
        stats = torch.ops.confeti_fast.proto_class_stats(feats, cam, labels, valid, prototypes.shape[0], int(top_k))
        reduce(*stats)
        torch.ops.confeti_fast.proto_ema_apply_(prototypes, counts, *stats, float(momentum))
    return prototypes, counts


def proto_class_stats(feats, cam, labels, valid=None, num_classes=None, top_k=32):
    """This rank's per-class statistics of the update's selection (docs/method.md §4).

    Returns weighted_sum (K, D) float32 = sum of w * v over the kept pixels (v the bilinear
    feature there), weight_sum (K,) float32 = sum of the kept w, kept (K,) int64 = how many
    were kept; contiguous, on feats' device. Summed in the one-shot op's order (deterministic).
    `num_classes` defaults to cam.shape[1] and is required when cam is None.
    """
    _require()
    num_classes = _num_classes(cam, num_classes, "proto_class_stats")
    labels, valid = _as_inputs(labels, valid)
    with torch.no_grad():
        return torch.ops.confeti_fast.proto_class_stats(feats, cam, labels, valid, num_classes, int(top_k))


def proto_ema_apply(prototypes, counts, weighted_sum, weight_sum, kept, momentum=0.999):
    """The EMA of docs/method.md §4 from (reduced) class statistics, in place; returns (prototypes, counts)."""
    _require()
    with torch.no_grad():
        torch.ops.confeti_fast.proto_ema_apply_(prototypes, counts, weighted_sum, weight_sum, kept, float(momentum))
    return prototypes, counts


def proto_select(cam, labels, valid=None, num_classes=None, top_k=32):
    """The pixels the update would keep: (indices, candidates).

    indices: (K, top_k) int64 flat indices into (B, H, W), best first, padded with -1;
    candidates: (K,) int64, the number of candidate pixels of each class. `num_classes`
    defaults to cam.shape[1] and is required when cam is None.
    """
    _require()
    num_classes = _num_classes(cam, num_classes, "proto_select")
    labels, valid = _as_inputs(labels, valid)
    return torch.ops.confeti_fast.proto_select(cam, labels, valid, num_classes, int(top_k))


def emulate_cuda(prototypes, counts, feats, cam, labels, valid=None, momentum=0.999, top_k=32):
    """Test hook: the CUDA kernels' algorithm run on the CPU, functional.

    Returns (new prototypes, new counts, indices, candidates).
    """
    _require()
    labels, valid = _as_inputs(labels, valid)
    return torch.ops.confeti_fast._emulate_cuda_proto_update(prototypes, counts, feats, cam, labels, valid,
                                                             float(momentum), int(top_k))
