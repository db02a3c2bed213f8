"""Convert official DiffusionInst checkpoints (detectron2 names) to ours, and load either kind.

CLI::

    python -m diffusioninst.convert SRC DST [--official-config config.yaml]

SRC: ``.pth`` (``torch.load(weights_only=True)``) or detectron2 ``.pkl`` (restricted unpickler: numpy arrays
and plain containers only), a plain state dict or one under ``"model"``. DST: ``{"model": state_dict,
"converted_from": SRC, "report": {...}}`` saved with ``torch.save``. With ``--official-config`` the result
is also checked against the model that config describes (missing/unexpected keys, shapes).

Name mapping (official -> ours): ``backbone.bottom_up.*`` -> ``backbone.*`` (ResNet; Swin: ``backbone.body.*``
through timm's filter and ``norm{i}`` -> ``out_norms.{i}``); ``backbone.fpn_lateral{k}`` / ``fpn_output{k}`` ->
``fpn.lateral_convs.{k-2}`` / ``fpn.output_convs.{k-2}``; ``head.head_series.{s}`` -> ``head.stages.{s}`` with
``inst_interact`` -> ``dynamic_conv``, ``block_time_mlp`` -> ``time_proj``, ``cls_module``/``reg_module`` ->
``cls_branch``/``reg_branch``, ``bboxes_delta`` -> ``bbox_delta``; ``head.mask_refine.{i}.{0,1}`` ->
``mask_branch.refine.{i}.{conv,norm}``; ``head.mask_head.{j}.{0,1}`` -> ``mask_branch.tower.{j}.{conv,norm}`` and
the last ``head.mask_head.{n}`` -> ``mask_branch.out_conv``; ``head.time_mlp`` unchanged. The diffusion
schedule buffers (``betas``, ``alphas_cumprod``, ...) are not stored: they are recomputed from the config
(and checked against it when loading).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from diffusioninst.model.state_io import read_state_dict

__all__ = ["CheckpointError", "convert_official_state_dict", "is_official", "load_checkpoint", "main"]

SCHEDULE_BUFFERS = {
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
}
_STAGE_RENAMES = [
    ("inst_interact.", "dynamic_conv."),
    ("block_time_mlp.", "time_proj."),
    ("cls_module.", "cls_branch."),
    ("reg_module.", "reg_branch."),
    ("bboxes_delta.", "bbox_delta."),
]


class CheckpointError(ValueError):
    """A checkpoint does not fit the model; the message lists missing/unexpected/mis-shaped keys."""


def is_official(state: dict[str, Tensor]) -> bool:
    """True for detectron2-named DiffusionInst state dicts."""
    return any(k.startswith(("head.head_series.", "backbone.bottom_up.", "head.mask_refine.")) for k in state)


def _mask_tower_length(state: dict[str, Tensor]) -> int:
    """Index of the final 1x1 conv in ``head.mask_head`` (the only entry without a sub-index)."""
    idx = [int(m.group(1)) for k in state if (m := re.match(r"^head\.mask_head\.(\d+)\.(weight|bias)$", k))]
    return max(idx) if idx else -1


def _rename(key: str, tower_end: int, swin: bool) -> str | None:
    m = re.match(r"^backbone\.bottom_up\.(.*)$", key)
    if m:
        rest = m.group(1)
        if not swin:
            return f"backbone.{rest}"
        n = re.match(r"^norm([0-3])\.(weight|bias)$", rest)
        return f"backbone.out_norms.{n.group(1)}.{n.group(2)}" if n else f"backbone.body.{rest}"
    m = re.match(r"^backbone\.fpn_(lateral|output)(\d)\.(.*)$", key)
    if m:
        kind = "lateral_convs" if m.group(1) == "lateral" else "output_convs"
        return f"fpn.{kind}.{int(m.group(2)) - 2}.{m.group(3)}"
    m = re.match(r"^head\.head_series\.(\d+)\.(.*)$", key)
    if m:
        rest = m.group(2)
        for old, new in _STAGE_RENAMES:
            if rest.startswith(old):
                rest = new + rest[len(old) :]
        return f"head.stages.{m.group(1)}.{rest}"
    m = re.match(r"^head\.mask_refine\.(\d+)\.([01])\.(.*)$", key)
    if m:
        return f"mask_branch.refine.{m.group(1)}.{'conv' if m.group(2) == '0' else 'norm'}.{m.group(3)}"
    m = re.match(r"^head\.mask_head\.(\d+)\.(.*)$", key)
    if m:
        j, rest = int(m.group(1)), m.group(2)
        if j == tower_end and rest in ("weight", "bias"):
            return f"mask_branch.out_conv.{rest}"
        sub = re.match(r"^([01])\.(.*)$", rest)
        if sub:
            return f"mask_branch.tower.{j}.{'conv' if sub.group(1) == '0' else 'norm'}.{sub.group(2)}"
        return None
    m = re.match(r"^head\.time_mlp\.(.*)$", key)
    if m:
        return key
    return None


def convert_official_state_dict(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, list[str]]]:
    """Official (detectron2-named) state dict -> (ours, report).

    The report has ``converted`` (official names), ``schedule`` (diffusion buffers dropped: recomputed from
    the config) and ``unmatched`` (official names no rule knows; not copied).
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}
    swin = any(k.startswith("backbone.bottom_up.layers.") for k in state)
    tower_end = _mask_tower_length(state)
    ours: dict[str, Tensor] = {}
    report: dict[str, list[str]] = {"converted": [], "schedule": [], "unmatched": []}
    swin_body: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in SCHEDULE_BUFFERS:
            report["schedule"].append(key)
            continue
        new = _rename(key, tower_end, swin)
        if new is None:
            report["unmatched"].append(key)
            continue
        if swin and new.startswith("backbone.body."):
            swin_body[new.removeprefix("backbone.body.")] = value
        else:
            ours[new] = value
        report["converted"].append(key)
    if swin_body:
        ours.update({f"backbone.body.{k}": v for k, v in _swin_to_timm(swin_body).items()})
    return ours, report


def _swin_to_timm(body: dict[str, Tensor]) -> dict[str, Tensor]:
    """Microsoft Swin names -> timm names (downsample moved to the next stage; buffers dropped)."""
    out = {}
    for k, v in body.items():
        if "relative_position_index" in k or "attn_mask" in k:
            continue
        k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k)
        out[k] = v
    return out


def _check_schedule(model: nn.Module, state: dict[str, Tensor], path: str) -> None:
    schedule = getattr(model, "schedule", None)
    betas = state.get("betas")
    if schedule is None or betas is None:
        return
    ours = schedule.betas.to(betas.device, torch.float64)
    if betas.shape != ours.shape or not torch.allclose(betas.double(), ours, rtol=1e-9, atol=1e-12):
        raise CheckpointError(
            f"{path}: the checkpoint's diffusion schedule (betas, {list(betas.shape)}) differs from the config's "
            f"(model.diffusion.timesteps={schedule.timesteps}, cosine_s={schedule.cfg.cosine_s})"
        )


def check_state_dict(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Raise :class:`CheckpointError` listing missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: checkpoint {list(state[k].shape)} vs model {list(expected[k].shape)}"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        lines = [f"{source} does not fit the model:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                lines.append(
                    f"  {title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else "")
                )
        raise CheckpointError("\n".join(lines))


def load_checkpoint(model: nn.Module, path: str | Path, strict: bool = True) -> dict[str, list[str]]:
    """Load our checkpoint or an official one (auto-detected) into ``model``.

    Returns the conversion report (empty lists for our own checkpoints). With ``strict`` any missing,
    unexpected or mis-shaped key raises :class:`CheckpointError` naming them; otherwise matching keys load.
    """
    state = read_state_dict(path, config_key="model.weights")
    report: dict[str, list[str]] = {"converted": [], "schedule": [], "unmatched": []}
    if is_official(state):
        _check_schedule(model, state, str(path))
        state, report = convert_official_state_dict(state)
    else:
        state = {k.removeprefix("module."): v for k, v in state.items()}
    if strict:
        check_state_dict(model, state, f"checkpoint '{path}'")
        model.load_state_dict(state, strict=True)
    else:
        expected = model.state_dict()
        fitting = {k: v for k, v in state.items() if k in expected and v.shape == expected[k].shape}
        model.load_state_dict(fitting, strict=False)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffusioninst.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="official checkpoint (.pth / .pkl)")
    parser.add_argument("dst", help="output file (.pth)")
    parser.add_argument("--official-config", help="official config.yaml: also check the result against that model")
    args = parser.parse_args(argv)
    try:
        state = read_state_dict(args.src, config_key="src")
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not is_official(state):
        print(f"error: {args.src} does not look like an official DiffusionInst checkpoint", file=sys.stderr)
        return 2
    ours, report = convert_official_state_dict(state)
    print(f"converted {len(report['converted'])} tensors; dropped {len(report['schedule'])} schedule buffers")
    if report["unmatched"]:
        print(f"unmatched ({len(report['unmatched'])}, not copied): {', '.join(report['unmatched'])}")
    if args.official_config:
        from diffusioninst.model.build import DiffusionInst
        from diffusioninst.model.official_config import from_official_config

        model = DiffusionInst(from_official_config(args.official_config)[0])
        try:
            _check_schedule(model, state, args.src)
            check_state_dict(model, ours, f"converted '{args.src}'")
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"checked against {args.official_config}: every key present with the right shape")
    Path(args.dst).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": ours, "converted_from": str(args.src), "report": report}, args.dst)
    print(f"wrote {args.dst}")
    return 1 if report["unmatched"] else 0


if __name__ == "__main__":
    sys.exit(main())
