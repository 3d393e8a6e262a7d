"""Loading the authors' files: CUT's `latest_net_{G,D,F}.pth` and CONFETI's mmseg checkpoints.

CUT files (taesungp/contrastive-unpaired-translation, BaseModel.save_networks) hold a plain
state dict of one network, keys `model.N.*` (G, D) or `mlp_{i}.{0,2}.{weight,bias}` (F),
possibly prefixed `module.` (DataParallel). `cut.py` builds the networks with the same
module tree, so `load_cut_state_dict` only strips the prefix and loads strictly.

The authors' segmentation checkpoints (cxa9264/CONFETI, mmcv `save_checkpoint` of the DACS
UDA module) hold {'meta', 'state_dict', 'optimizer'}; `convert_mmseg_checkpoint` maps
'state_dict' to our layout. The CUT networks are not in it: the authors' `cut_model` is a
CUT `BaseModel` (an ABC, not an nn.Module; cut/models/base_model.py), so G is saved apart
(`cut_checkpoints/<exp>_netG_<iter>.pth`, dacs.py) and loads with `load_cut_state_dict`.

The key mapping is tabled in docs/checkpoints.md; its "src" column cites these sources.

Sources (public repos):
1. lhoyer/DAFormer mmseg/models/uda/uda_decorator.py: `self.model = build_segmentor(...)`.
2. mmseg ResNetV1c: keys `stem.N.*`, `layerX.Y.{conv,bn}Z.*`, `layerX.0.downsample.{0,1}.*`,
   the same as ours (resnet.py), so `<k>` is kept as is.
3. lhoyer/DAFormer mmseg/models/decode_heads/dlv2_head.py + aspp_head.py: `aspp_modules` is an
   `ASPPModule` (ModuleList) of mmcv `ConvModule`s, norm and act None, hence the `.conv.` level
   and a bias; `conv_seg` is deleted.
4. cxa9264/CONFETI mmseg/models/uda/dacs.py: `self.ema_model`, `self.imnet_model`,
   `self.aux_heads` / `self.ema_aux_heads` (ModuleLists), `self.tgt_proto = Prototypes(...)`,
   `self.reg_proj = nn.Conv2d(512, 512, kernel_size=1)` (bias: the unused RegProjHead of
   decode_heads/reg_proj.py has none, and is not this).
5. cxa9264/CONFETI configs/confeti/confeti_{1st,2nd}.py: `aux_heads=[cam_head, contrastive_head]`.
6. cxa9264/CONFETI mmseg/models/decode_heads/cam_head.py: `self.conv_cam` (1x1, no bias).
7. cxa9264/CONFETI mmseg/models/decode_heads/contrastive_head.py: `self.conv_proj` (1x1, no bias).
8. cxa9264/CONFETI mmseg/models/uda/proto.py: `self.register_buffer('proto', ...)`.

The heads are recognised by their own attribute name (`conv_cam`, `conv_proj`), whatever their
index in `aux_heads` (a single, non-list head gives `aux_heads.conv_cam.weight`). A
`module.` prefix on every key is removed first; `decode_head.aspp_modules.<n>.weight` (no
`.conv.` level) is accepted too. The prototype counts are not saved by the authors
(`Prototypes.update_count` is a plain attribute), so the converted checkpoint has none; the
multi-layer variant (`src_proto`, `tgt_proto.<i>`) and anything else unknown is an error
listing the keys. `load_authors_checkpoint` reads with weights_only=True, allowing numpy
scalars/arrays/dtypes (mmseg's eval hook stores `meta.hook_msgs.best_score` as numpy.float64).
The result serves evaluation (test.py); it is not a resumable training checkpoint.
"""
import re


from ..serialization import read_checkpoint, read_mmcv_checkpoint
from ..errors import ConfetiError
from .weights import _examples, _strip_prefix, extract_state_dict, load_model_weights

_SEGMENTORS = ("model", "ema_model", "imnet_model")
_ASPP = re.compile(r"^decode_head\.aspp_modules\.(\d+)\.(?:conv\.)?(weight|bias)$")
_HEAD = re.compile(r"^(ema_aux_heads|aux_heads)\.(?:\d+\.)?(conv_cam|conv_proj)\.weight$")


def load_cut_state_dict(module, path, what="CUT checkpoint"):
    """Load an original CUT file (`latest_net_G.pth`, `latest_net_D.pth`, `latest_net_F.pth`)
    into `module` (a `CutGenerator`, `PatchDiscriminator` or `PatchSampleF`) strictly.

    Keys may carry a `module.` prefix (DataParallel). Missing, unexpected or misshaped keys
    raise a one-line `ConfetiError` naming the file and listing them. Returns `module`.
    """
    return fit_cut_state_dict(module, read_checkpoint(path, what), path, what)


def fit_cut_state_dict(module, ckpt, path, what="CUT checkpoint"):
    """`load_cut_state_dict` for a file already read (`ckpt`, what `read_checkpoint(path)` gave)."""
    sd = extract_state_dict(ckpt, f"{what} {path}")
    sd = _strip_prefix(sd, "module.")
    return load_model_weights(module, sd, f"{path} ({what})")


def _segmentor_key(rest):
    """Our segmentor key for an mmseg EncoderDecoder key (after 'model.' etc.), or None."""
    if rest.startswith("backbone."):
        return rest
    m = _ASPP.match(rest)
    if m:
        return f"decode_head.aspp_modules.{m.group(1)}.{m.group(2)}"
    return None


def convert_mmseg_checkpoint(state_dict_or_ckpt, what="authors' checkpoint"):
    """Map the authors' mmseg/DACS checkpoint (or its 'state_dict') to our checkpoint layout.

    Returns {'model': student segmentor state dict, 'student': {'segmentor', 'cam_head',
    'proj_head'}, 'teacher': {...} (when `ema_model.*` exists), 'imnet': segmentor state dict
    (when `imnet_model.*` exists), 'reg_proj': {...}, 'prototypes': K x 512 tensor,
    'iteration': int} — each entry only when its source keys are there. The table in this
    module's docstring lists the mapping. Keys that cannot be placed raise one `ConfetiError`
    line listing the first few and their count.
    """
    ckpt = state_dict_or_ckpt
    sd = extract_state_dict(ckpt, what)
    sd = _strip_prefix(sd, "module.")

    segs = {name: {} for name in _SEGMENTORS}
    heads = {"student": {}, "teacher": {}}
    reg_proj, prototypes, unplaced = {}, None, []
    for key, value in sd.items():
        prefix, _, rest = key.partition(".")
        if prefix in _SEGMENTORS and rest:
            ours = _segmentor_key(rest)
            if ours is None:
                unplaced.append(key)
            elif ours in segs[prefix]:
                raise ConfetiError(f"{what}: {key} maps onto {prefix}.{ours} twice "
                                   f"(both 'aspp_modules.N.weight' and 'aspp_modules.N.conv.weight'?)")
            else:
                segs[prefix][ours] = value
            continue
        m = _HEAD.match(key)
        if m:
            net = "teacher" if m.group(1) == "ema_aux_heads" else "student"
            part, ours = ("cam_head", "conv.weight") if m.group(2) == "conv_cam" else ("proj_head", "weight")
            if part in heads[net]:
                raise ConfetiError(f"{what}: two {m.group(2)} heads under {m.group(1)} (e.g. {key})")
            heads[net][part] = {ours: value}
            continue
        if key in ("reg_proj.weight", "reg_proj.bias"):
            reg_proj[key.split(".", 1)[1]] = value
            continue
        if key == "tgt_proto.proto":
            prototypes = value
            continue
        unplaced.append(key)

    if unplaced:
        raise ConfetiError(f"{what}: {len(unplaced)} key(s) cannot be placed in the confeti_fast layout: "
                           f"{_examples(unplaced)}")
    if not segs["model"]:
        raise ConfetiError(f"{what} is not a CONFETI/DAFormer mmseg checkpoint: it has no model.backbone.* keys "
                           f"(first keys: {_examples(list(sd))})")

    out = {"model": segs["model"], "student": {"segmentor": segs["model"], **heads["student"]}}
    if segs["ema_model"] or heads["teacher"]:
        out["teacher"] = {"segmentor": segs["ema_model"], **heads["teacher"]}
        if not segs["ema_model"]:
            raise ConfetiError(f"{what} has EMA head weights (ema_aux_heads.*) but no ema_model.* segmentor")
    if segs["imnet_model"]:
        out["imnet"] = segs["imnet_model"]
    if reg_proj:
        out["reg_proj"] = reg_proj
    if prototypes is not None:
        out["prototypes"] = prototypes
    meta = ckpt.get("meta") if isinstance(ckpt, dict) else None
    if isinstance(meta, dict) and isinstance(meta.get("iter"), int):
        out["iteration"] = meta["iter"]
    return out


def load_authors_checkpoint(path):
    """Read an authors' mmseg checkpoint (torch.load weights_only=True) and convert it
    (`convert_mmseg_checkpoint`); one-line `ConfetiError` naming the file on any problem."""
    what = "authors' checkpoint"
    ckpt = read_mmcv_checkpoint(path, what)
    return convert_mmseg_checkpoint(ckpt, f"{what} {path}")
