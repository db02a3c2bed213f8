"""Parity with the official DiffusionInst, against recorded fixtures.

Every folder under ``<repo>/../shared/parity/`` and in ``$DIFFUSIONINST_PARITY_FIXTURES`` (os.pathsep-separated)
holding a ``config.yaml`` is a fixture: the official model's config, weights (official names, loaded through
the converter), input, recorded random draws and every intermediate tensor of one inference and one training
forward/backward. Everything (sizes, stages, steps, classes) is read from the fixture.

Tolerances: float tensors 1e-4 relative to the reference's max magnitude (1e-12 for pure float64 math on
recorded inputs); integer decisions exact; final masks exact up to ``MASK_PIXEL_SLACK`` pixels (a pixel whose
probability is within float rounding of the threshold may flip on another CPU).
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import pytest
import torch

from diffusioninst.convert import convert_official_state_dict, load_checkpoint
from diffusioninst.model import ReplayNoise, build_model, postprocess
from diffusioninst.model.official_config import from_official_config

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-4
RTOL64 = 1e-12
MASK_PIXEL_SLACK = 1e-5  # fraction of mask pixels allowed to differ (boundary pixels only)


def _fixture_dirs() -> list[Path]:
    roots = [ROOT / ".." / "shared" / "parity"]
    env = os.environ.get("DIFFUSIONINST_PARITY_FIXTURES", "")
    dirs: list[Path] = [Path(p) for p in env.split(os.pathsep) if p]
    for root in roots:
        if root.is_dir():
            dirs += sorted(p for p in root.iterdir() if (p / "config.yaml").is_file())
    return [d.resolve() for d in dirs]


FIXTURES = _fixture_dirs()
if not FIXTURES:
    pytest.skip(
        "no parity fixtures: neither <repo>/../shared/parity/*/config.yaml nor $DIFFUSIONINST_PARITY_FIXTURES exist",
        allow_module_level=True,
    )
IDS = [d.name for d in FIXTURES]


def close(ours: torch.Tensor, ref: torch.Tensor, name: str, rtol: float = RTOL) -> float:
    """Assert ``ours`` ~ ``ref`` (same shape; max |diff| <= rtol * max |ref|); returns the relative error."""
    assert tuple(ours.shape) == tuple(ref.shape), f"{name}: shape {list(ours.shape)} vs {list(ref.shape)}"
    a, b = ours.detach().double().cpu(), ref.detach().double().cpu()
    scale = b.abs().max().item() if b.numel() else 0.0
    err = (a - b).abs().max().item() if b.numel() else 0.0
    rel = err / scale if scale > 0 else err
    assert rel <= rtol, f"{name}: relative error {rel:.3g} > {rtol:g}"
    return rel


class Fixture:
    """One fixture folder: the official records and our model built from its config with its weights."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.model_cfg, self.sampler_cfg = from_official_config(folder / "config.yaml")
        self.input = torch.load(folder / "input.pt", weights_only=False)
        self.inf = torch.load(folder / "inference.pt", weights_only=False)
        self.train = torch.load(folder / "train.pt", weights_only=False)
        image = self.input["image_rgb_chw_uint8"]
        self.images = image[None]
        self.sizes = torch.tensor([list(image.shape[-2:])])
        self.output_size = (int(self.input["output_height"]), int(self.input["output_width"]))

    def model(self):
        torch.manual_seed(0)
        model = build_model(self.model_cfg)
        report = load_checkpoint(model, self.folder / "model_state_dict.pth")
        assert not report["unmatched"], report["unmatched"]
        return model

    @staticmethod
    def replay(calls: list[dict]) -> ReplayNoise:
        return ReplayNoise([c["value"] for c in calls], [c["fn"].rsplit(".", 1)[-1] for c in calls])


@pytest.fixture(autouse=True)
def one_thread():
    """The fixtures were recorded with 1 thread; multi-threaded reductions (conv backward) sum in another order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@cache
def inference_run(folder: Path):
    fx = Fixture(folder)
    model = fx.model().eval()
    encoded = model.encode(fx.images, fx.sizes)
    noise = fx.replay(fx.inf["rng_calls"])
    det = model.sample(encoded, fx.sampler_cfg, noise, record=True)[0]
    return fx, model, encoded, noise, det


@cache
def training_run(folder: Path):
    fx = Fixture(folder)
    model = fx.model().train()
    targets = [
        {"boxes": fx.input["gt_boxes_abs_xyxy"], "labels": fx.input["gt_classes"], "masks": fx.input["gt_bitmasks"]}
    ]
    noise = fx.replay(fx.train["rng_calls"])
    record: dict = {}
    losses = model(fx.images, fx.sizes, targets, noise=noise, record=record)
    total = sum(losses.values())
    total.backward()
    return fx, model, noise, record, losses, total


# --- inference ------------------------------------------------------------------------------------
@pytest.mark.parametrize("folder", FIXTURES, ids=IDS)
def test_encoder_features(folder):
    fx, model, enc, _, _ = inference_run(folder)
    close(model.preprocess(fx.images, fx.sizes), fx.inf["backbone_input_normalized"], "normalized input")
    with torch.no_grad():
        bottom_up = model.backbone(model.preprocess(fx.images, fx.sizes))
    for name, ref in fx.inf["bottom_up"].items():
        close(bottom_up[name], ref, f"backbone {name}")
    for name, ref in fx.inf["fpn"].items():
        close(enc.fpn[name], ref, f"FPN {name}")
    first = fx.inf["head_calls"][0]
    with torch.no_grad():
        for i, level in enumerate(model.cfg.mask.in_features):
            refine = model.mask_branch.refine[i](enc.fpn[level])
            rec = first[f"mask_refine{i}_out"]
            close(refine[:, :4], rec["first4ch"], f"mask refine {i} (channels 0-3)")
            assert abs(refine.mean().item() - rec["stats"]["mean"]) <= RTOL * max(1.0, abs(rec["stats"]["mean"]))
            assert list(refine.shape) == rec["stats"]["shape"]
    close(enc.mask_feat, first["mask_feat"], "mask features F_mask")


@pytest.mark.parametrize("folder", FIXTURES, ids=IDS)
def test_head_stages_every_step(folder):
    fx, _, _, _, det = inference_run(folder)
    assert len(det.trace["head"]) == len(fx.inf["head_calls"])
    for s, (ours, ref) in enumerate(zip(det.trace["head"], fx.inf["head_calls"])):
        close(ours["time_emb"], ref["time_emb"][0], f"step {s} time embedding")
        assert len(ours["stages"]) == len(ref["stages"])
        for k, (o, r) in enumerate(zip(ours["stages"], ref["stages"])):
            tag = f"step {s} stage {k}"
            close(o["in_boxes"], r["in_boxes_abs_xyxy"][0], f"{tag} input boxes")
            close(o["logits"], r["class_logits"][0], f"{tag} class logits")
            close(o["boxes"], r["pred_boxes_abs_xyxy"][0], f"{tag} boxes")
            close(o["kernels"], r["kernel_params"][0], f"{tag} mask filter params")
            close(o["obj"], r["obj_features"][0], f"{tag} obj features")
            if "roi_features" in ref and isinstance(ref["roi_features"], list):
                close(o["roi"], ref["roi_features"][k], f"{tag} RoI features")


@pytest.mark.parametrize("folder", FIXTURES, ids=IDS)
def test_sampler_steps_and_draws(folder):
    fx, _, _, noise, det = inference_run(folder)
    assert noise.exhausted, "every recorded random draw must be consumed, in order"
    steps = det.trace["steps"]
    assert [s["time"] for s in steps] == [r["time"] for r in fx.inf["steps"]]
    for s, (o, r) in enumerate(zip(steps, fx.inf["steps"])):
        assert o["x_t"].dtype == r["x_t_signal_cxcywh"].dtype, f"step {s}: x_t dtype (official promotion rules)"
        close(o["x_t"], r["x_t_signal_cxcywh"][0], f"step {s} x_t")
        close(o["pred_x_start"], r["pred_x_start_signal_cxcywh"][0], f"step {s} predicted x_start")
        close(o["pred_noise"], r["pred_noise"][0], f"step {s} predicted noise")
        close(o["max_score"], r["renewal_max_score"], f"step {s} renewal max score")
        assert torch.equal(o["keep"], r["renewal_keep_mask"]), f"step {s}: renewal keep mask"
        assert int(o["keep"].sum()) == r["num_remain"]


def _sorted_candidates(boxes, scores, labels):
    order = torch.argsort(labels.double() * 10 + scores.double(), stable=True)
    return boxes[order], scores[order], labels[order]


@pytest.mark.parametrize("folder", FIXTURES, ids=IDS)
def test_ensemble_members_and_nms(folder):
    fx, _, _, _, det = inference_run(folder)
    members = det.trace["members"]
    assert len(members) == len(fx.inf["inference_calls"])
    for i, (m, r) in enumerate(zip(members, fx.inf["inference_calls"])):
        # topk(sorted=False) order is implementation-defined: compare as sorted sets
        ob, os_, ol = _sorted_candidates(m["boxes"], m["scores"], m["labels"])
        rb, rs, rl = _sorted_candidates(r["boxes_abs_xyxy"], r["scores"], r["labels"])
        assert torch.equal(ol, rl), f"member {i}: labels"
        close(os_, rs, f"member {i} scores")
        close(ob, rb, f"member {i} boxes")
    nms = fx.inf["nms_calls"][0]
    assert len(det.trace["nms"]["keep"]) == len(nms["keep"]), "NMS kept count"
    # keep indices are sorted by decreasing score: the kept detections must match in order
    close(det.scores, nms["scores"][nms["keep"]], "kept scores")
    assert torch.equal(det.labels, nms["labels"][nms["keep"]]), "kept labels"
    close(det.boxes, nms["boxes"][nms["keep"]], "kept boxes")


@pytest.mark.parametrize("folder", FIXTURES, ids=IDS)
def test_mask_head_and_postprocess(folder):
    fx, model, _, _, det = inference_run(folder)
    call = fx.inf["mask_head_calls"][-1]
    assert call["num_instances"] == len(det)
    logits = model.mask_head(det.mask_feat, det.kernels)
    close(logits, call["mask_logits"][0], "dynamic mask head logits")
    pp = fx.inf["postprocess_calls"][-1]
    assert tuple(pp["in_image_size"]) == det.image_size
    out = postprocess(det, det.image_size, tuple(pp["output_hw"]), mask_head=model.mask_head)
    final = fx.inf["final"]
    assert torch.equal(out["labels"], final["labels"]) and len(out["scores"]) == pp["out_nonempty_count"]
    close(out["boxes"], final["boxes_abs_xyxy"], "final boxes (output frame)")
    close(out["scores"], final["scores"], "final scores")
    differing = int((out["masks"] != final["masks"]).sum())
    assert differing <= MASK_PIXEL_SLACK * final["masks"].numel(), f"{differing} final mask pixels differ"
    reference = postprocess(det, det.image_size, tuple(pp["output_hw"]), mask_head=model.mask_head, reference=True)
    assert torch.equal(reference["masks"], out["masks"]), "windowed and full-image rendering must agree exactly"


# --- training -------------------------------------------------------------------------------------
@pytest.mark.parametrize("folder", FIXTURES, ids=IDS)
def test_training_corruption_and_head(folder):
    fx, _, noise, rec, _, _ = training_run(folder)
    assert noise.exhausted
    c, q = rec["corrupted"][0], fx.train["q_sample_calls"][0]
    assert int(c.t) == int(q["t"])
    close(c.x_start, q["x_start_signal_cxcywh"], "q_sample x_start", RTOL64)
    close(c.x_t, q["x_t_signal_cxcywh"], "q_sample x_t (float64)", RTOL64)
    close(c.boxes_norm_xyxy, fx.train["prepare_targets"]["diffused_boxes_norm_xyxy"][0], "diffused boxes", RTOL64)
    head = fx.train["head_calls"][0]
    for k, (o, r) in enumerate(zip(rec["head"]["stages"], head["stages"])):
        close(o["in_boxes"], r["in_boxes_abs_xyxy"], f"train stage {k} input boxes")
        close(o["logits"], r["class_logits"], f"train stage {k} logits")
        close(o["boxes"], r["pred_boxes_abs_xyxy"], f"train stage {k} boxes")
        close(o["kernels"], r["kernel_params"], f"train stage {k} mask params")
    close(rec["outputs"]["mask_feat"], head["mask_feat"], "train F_mask (batch statistics)")


@pytest.mark.parametrize("folder", FIXTURES, ids=IDS)
def test_matcher_per_stage(folder):
    fx, _, _, rec, _, _ = training_run(folder)
    assert len(rec["matches"]) == len(fx.train["match_calls"])  # order: last stage, then stage 0, 1, ...
    for i, (ours, ref) in enumerate(zip(rec["matches"], fx.train["match_calls"])):
        m = ours[0]
        close(m.cost, ref["cost_matrix"][0], f"match {i} cost matrix")
        close(m.ious, ref["pair_wise_ious"][0], f"match {i} IoUs")
        assert torch.equal(m.fg_mask, ref["fg_mask"][0]), f"match {i} fg mask"
        assert torch.equal(m.in_box_and_center, ref["is_in_boxes_and_center"][0]), f"match {i} in box & center"
        assert m.dynamic_ks.tolist() == ref["dynamic_ks(derived)"][0].tolist(), f"match {i} dynamic k"
        assert torch.equal(m.selected, ref["selected_query_mask"][0]), f"match {i} selected queries"
        assert torch.equal(m.gt_indices, ref["gt_indices"][0]), f"match {i} GT indices"
        assert torch.equal(m.matched_query_per_gt, ref["matched_query_id_per_gt"][0]), f"match {i} query per GT"


@pytest.mark.parametrize("folder", FIXTURES, ids=IDS)
def test_losses(folder):
    fx, _, _, rec, losses, total = training_run(folder)
    for i, (ours, ref) in enumerate(zip(rec["dice"], fx.train["dice_calls"])):
        close(ours["per_instance"], ref["per_instance_loss"], f"dice call {i}")
        close(
            ours["mask_logits"],
            fx.train["criterion_mask_head_calls"][i]["mask_logits"][0],
            f"criterion mask logits {i}",
        )
    assert set(losses) == set(fx.train["loss_weighted"]), "loss keys as official"
    for key, ref in fx.train["loss_raw"].items():
        close(rec["raw"][key], ref, f"raw {key}")
        close(losses[key], fx.train["loss_weighted"][key], f"weighted {key}")
    close(total, fx.train["loss_total"], "total loss")


@pytest.mark.parametrize("folder", FIXTURES, ids=IDS)
def test_batchnorm_running_stats_after_train_forward(folder):
    fx, model, _, _, _, _ = training_run(folder)
    converted, _ = convert_official_state_dict(fx.train["bn_running_after_train_forward"])
    state = model.state_dict()
    for key, ref in converted.items():
        if key.endswith("num_batches_tracked"):
            assert int(state[key]) == int(ref), key
        else:
            close(state[key], ref, key)


# Gradients are float32 sums over many pixels whose ReLU decisions can flip between CPUs (oneDNN picks other
# kernels, so other rounding, on AVX2 and AVX-512 machines): one pre-activation within rounding of zero in
# the constant zero-padded region flips the gradient of thousands of identical pixels at once. Measured on an
# AVX2 box against the fixtures (recorded elsewhere): the whole gradient agrees to 2.0e-5 relative (L2),
# the worst single tensor (a mask-branch BatchNorm bias, behind such a flip) to 6.5e-3 of its max; on the
# machine the fixtures came from, everything agrees to 1.7e-6. So: the gradient as a whole to RTOL, and every
# tensor to GRAD_TENSOR_RTOL, which still catches any wrong term, scale or missing path (errors of 1e-1+).
GRAD_TENSOR_RTOL = 1e-2


@pytest.mark.parametrize("folder", FIXTURES, ids=IDS)
def test_gradients(folder):
    fx, model, _, _, _, _ = training_run(folder)
    grads = torch.load(folder / "train_grads.pt", weights_only=False)
    converted, report = convert_official_state_dict(grads)
    assert not report["unmatched"]
    params = dict(model.named_parameters())
    diffs, refs = [], []
    for key, ref in converted.items():
        assert params[key].grad is not None, f"{key}: no gradient (official has one)"
        ours, ref = params[key].grad.double(), ref.double()
        scale = ref.abs().max().item()
        err = (ours - ref).abs().max().item()
        assert err <= GRAD_TENSOR_RTOL * max(scale, 1e-6), f"{key}: gradient error {err:.3g} (max |g| {scale:.3g})"
        diffs.append((ours - ref).flatten())
        refs.append(ref.flatten())
    total = (torch.cat(diffs).norm() / torch.cat(refs).norm()).item()
    assert total <= RTOL, f"whole gradient: relative L2 error {total:.3g} > {RTOL:g}"
    without, _ = convert_official_state_dict({k: torch.zeros(1) for k in fx.train["params_without_grad"]})
    ours_without = {k for k, p in params.items() if p.grad is None}
    assert ours_without == set(without), "parameters without gradient"
