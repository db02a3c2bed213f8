"""Pure math of the model against closed forms and hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou, sigmoid_focal_loss

from diffusioninst.config.schema import DiffusionConfig, LossConfig
from diffusioninst.model import DynamicMaskHead
from diffusioninst.model.box_ops import (
    apply_deltas,
    cxcywh_to_xyxy,
    paired_generalized_box_iou,
    signal_to_xyxy_abs,
    xyxy_abs_to_signal,
    xyxy_to_cxcywh,
)
from diffusioninst.model.criterion import dice_loss, federated_classes
from diffusioninst.model.diffusion import DiffusionSchedule, ddim_coefficients, ddim_time_pairs, repeat_counts
from diffusioninst.model.head_stage import _SplitLinear
from diffusioninst.model.mask_branch import aligned_bilinear
from diffusioninst.model.matcher import DynamicKMatcher
from diffusioninst.model.noise import GeneratorNoise, ReplayNoise
from diffusioninst.model.pooler import MultiLevelRoIAlign, assign_levels, roi_align_backward_sparse


def test_box_conversions_closed_form():
    xyxy = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    assert xyxy_to_cxcywh(xyxy).tolist() == [[20.0, 40.0, 20.0, 40.0]]
    assert cxcywh_to_xyxy(torch.tensor([[20.0, 40.0, 20.0, 40.0]])).tolist() == xyxy.tolist()
    whwh = torch.tensor([[100.0, 80.0, 100.0, 80.0]])
    signal = xyxy_abs_to_signal(xyxy[None], whwh, 2.0)  # cx 0.2 -> (0.4 - 1) * 2 = -1.2, h 0.5 -> 0
    assert torch.allclose(signal, torch.tensor([[[-1.2, 0.0, -1.2, 0.0]]]))
    assert torch.allclose(signal_to_xyxy_abs(signal, whwh, 2.0), xyxy[None])
    # out-of-range signal is clamped to [-scale, scale] before mapping: cx = 1, w = 1 -> [0.5 w, ..., 1.5 w]
    far = signal_to_xyxy_abs(torch.tensor([[[9.0, 9.0, 9.0, 9.0]]]), whwh, 2.0)
    assert far.tolist() == [[[50.0, 40.0, 150.0, 120.0]]]


def test_apply_deltas_closed_form_and_clamp():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 20.0]], dtype=torch.float64)  # cast to the deltas' dtype
    deltas = torch.tensor([[2.0, 4.0, math.log(2.0), 0.0]])
    out = apply_deltas(deltas, boxes, (2.0, 2.0, 1.0, 1.0), 4.0)
    # dx = 1, dy = 2 -> centre (5 + 10, 10 + 40); w = 20, h = 20
    assert out.dtype == torch.float32 and torch.allclose(out, torch.tensor([[5.0, 40.0, 25.0, 60.0]]))
    huge = apply_deltas(torch.tensor([[0.0, 0.0, 100.0, 0.0]]), boxes.float(), (2.0, 2.0, 1.0, 1.0), 1.0)
    assert torch.allclose(huge[0, 2] - huge[0, 0], torch.tensor(10 * math.e))


def test_paired_giou_is_the_diagonal():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(6, 2, generator=g) * 50
    b = torch.rand(6, 2, generator=g) * 50
    boxes1 = torch.cat([a, a + torch.rand(6, 2, generator=g) * 30 + 1], 1)
    boxes2 = torch.cat([b, b + torch.rand(6, 2, generator=g) * 30 + 1], 1)
    assert torch.allclose(paired_generalized_box_iou(boxes1, boxes2), torch.diag(generalized_box_iou(boxes1, boxes2)))


def test_cosine_schedule_closed_form():
    sched = DiffusionSchedule(DiffusionConfig())
    assert sched.alphas_cumprod.dtype == torch.float64 and sched.alphas_cumprod.shape == (1000,)
    s, T = 0.008, 1000

    def f(t):
        return math.cos(((t / T) + s) / (1 + s) * math.pi / 2) ** 2

    for t in (0, 1, 10, 500, 900, 990):  # betas below the 0.999 clip: the product telescopes
        assert sched.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-12)
    assert sched.betas.max().item() <= 0.999 and sched.betas.min().item() >= 0


def test_ddim_time_pairs():
    assert ddim_time_pairs(1000, 1) == [(999, -1)]
    assert ddim_time_pairs(1000, 4) == [(999, 749), (749, 499), (499, 249), (249, -1)]
    assert [t for t, _ in ddim_time_pairs(1000, 3)] == [999, 665, 332]
    with pytest.raises(ValueError):
        ddim_time_pairs(1000, 0)


def test_q_sample_and_predict_noise_invert_each_other():
    sched = DiffusionSchedule(DiffusionConfig())
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    t = torch.tensor([321])
    x_t = sched.q_sample(x0, t, eps)
    ac = sched.alphas_cumprod[321]
    assert torch.allclose(x_t, ac.sqrt() * x0.double() + (1 - ac).sqrt() * eps.double())
    assert torch.allclose(sched.predict_noise(x_t[None], t, x0[None])[0], eps.double(), atol=1e-9)


def test_ddim_update_closed_form_eta_one_and_zero():
    sched = DiffusionSchedule(DiffusionConfig())
    x0, eps, z = torch.full((3, 4), 0.5), torch.full((3, 4), -1.0, dtype=torch.float64), torch.ones(3, 4)
    a, an = sched.alphas_cumprod[749], sched.alphas_cumprod[499]
    sigma = math.sqrt((1 - a / an) * (1 - an) / (1 - a))
    c = math.sqrt(1 - an - sigma**2)
    out = sched.ddim_step(x0, eps, z, 749, 499, 1.0)
    assert out.dtype == torch.float64  # float64 schedule, as official
    assert torch.allclose(out, torch.full((3, 4), 0.5 * math.sqrt(an) - c + sigma, dtype=torch.float64))
    sigma0, c0 = ddim_coefficients(a, an, 0.0)
    assert sigma0.item() == 0 and c0.item() == pytest.approx(math.sqrt(1 - an))
    det = sched.ddim_step(x0, eps, z * 100, 749, 499, 0.0)  # eta = 0 ignores the noise
    assert torch.allclose(det, torch.full((3, 4), 0.5 * math.sqrt(an) - math.sqrt(1 - an), dtype=torch.float64))


def test_corruption_pads_gt_first_and_handles_empty_and_too_many():
    sched = DiffusionSchedule(DiffusionConfig())
    gt = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.3, 0.6, 0.1, 0.1]])
    noise = ReplayNoise([torch.tensor([0]), torch.zeros(6, 4), torch.zeros(4, 4)])
    out = sched.corrupt(gt, 6, noise)
    # t = 0: x_t ~ x_start; GT first, then placeholders randn/6 + 0.5 = 0.5
    assert torch.allclose(out.x_start[:2], (gt * 2 - 1) * 2)
    assert torch.allclose(out.x_start[2:], torch.zeros(4, 4))
    empty = sched.corrupt(torch.zeros(0, 4), 3, GeneratorNoise(0))
    assert torch.allclose(empty.x_start[0], torch.tensor([0.0, 0.0, 2.0, 2.0]))  # fake GT [0.5, 0.5, 1, 1]
    many = torch.rand(10, 4, generator=torch.Generator().manual_seed(0))
    sub = sched.corrupt(many, 4, GeneratorNoise(0))
    rows = [int(((many * 2 - 1) * 2 - r).abs().sum(1).argmin()) for r in sub.x_start]
    assert rows == sorted(rows) and len(set(rows)) == 4  # a subset, in GT order
    pad = sched.corrupt(gt, 6, ReplayNoise([torch.tensor([5]), torch.zeros(6, 4), torch.full((4, 4), -6.0)]))
    assert torch.allclose(pad.x_start[2:, 2:], torch.full((4, 2), (1e-4 * 2 - 1) * 2))  # w, h clipped at 1e-4


def test_repeat_padding_fills_the_proposals_with_gt_copies():
    sched = DiffusionSchedule(DiffusionConfig(gt_padding="repeat"))
    gt = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.3, 0.6, 0.1, 0.1], [0.7, 0.2, 0.3, 0.2]])
    # 7 slots for 3 GT: 2 copies each, and one more for the GT with the largest key (the third)
    keys = torch.tensor([0.1, -1.0, 2.0])
    out = sched.corrupt(gt, 7, ReplayNoise([torch.tensor([0]), torch.zeros(7, 4), keys]))
    expected = ((gt * 2 - 1) * 2)[torch.tensor([0, 0, 1, 1, 2, 2, 2])]
    assert torch.equal(out.x_start, expected)
    # zero noise: x_t = sqrt(alpha_bar_0) x_start, mapped back to normalized xyxy boxes in the same order
    x_t = sched.sqrt_alphas_cumprod[0] * expected.double()
    assert torch.allclose(out.boxes_norm_xyxy, cxcywh_to_xyxy((x_t / 2 + 1) / 2), rtol=0, atol=1e-12)
    # N divisible by G: no key is drawn; an image without GT repeats the fake box; G > N keeps a subset
    even = sched.corrupt(gt[:2], 6, ReplayNoise([torch.tensor([3]), torch.zeros(6, 4)]))
    assert torch.equal(even.x_start, ((gt[:2] * 2 - 1) * 2).repeat_interleave(3, dim=0))
    empty = sched.corrupt(torch.zeros(0, 4), 3, GeneratorNoise(0))
    assert torch.allclose(empty.x_start, torch.tensor([[0.0, 0.0, 2.0, 2.0]]).expand(3, 4))
    assert sched.corrupt(gt, 2, GeneratorNoise(0)).x_start.shape == (2, 4)
    counts = repeat_counts(5, 23, GeneratorNoise(1))
    assert counts.sum() == 23 and sorted(counts.tolist()) == [4, 4, 5, 5, 5]
    with pytest.raises(ValueError, match="num_gt"):
        repeat_counts(0, 5, GeneratorNoise(0))


def test_train_t_min_restricts_the_training_timesteps():
    gt = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    official = DiffusionSchedule(DiffusionConfig())
    late = DiffusionSchedule(DiffusionConfig(train_t_min=600))
    ts = []
    for seed in range(200):
        # the official draw is torch.randint(0, T, (1,)) first from the image's generator
        expected = torch.randint(0, 1000, (1,), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(official.corrupt(gt, 4, GeneratorNoise(seed)).t, expected)
        ts.append(int(late.corrupt(gt, 4, GeneratorNoise(seed)).t))
    assert min(ts) >= 600 and max(ts) <= 999 and len(set(ts)) > 100
    # the boxes are noised at the drawn t: zero noise gives sqrt(alpha_bar_t) x_start
    out = late.corrupt(gt, 1, ReplayNoise([torch.tensor([700]), torch.zeros(1, 4)]))
    x_start = (gt * 2 - 1) * 2
    assert torch.allclose(out.x_t, late.sqrt_alphas_cumprod[700] * x_start.double(), rtol=0, atol=1e-12)
    with pytest.raises(RuntimeError, match=r"outside \[600, 1000\)"):  # the draw's bounds are [t_min, T)
        late.corrupt(gt, 1, ReplayNoise([torch.tensor([599]), torch.zeros(1, 4)]))
    assert DiffusionConfig(train_t_min=1000).check()[0][0] == "model.diffusion.train_t_min"
    assert DiffusionConfig(train_t_min=999).check() == []


def test_dice_and_focal_closed_form():
    p = torch.tensor([[0.5, 0.5, 0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    # 1 - 2 * 1.5 / (1.5 + 2 + eps)
    assert dice_loss(p, t, 1e-5).item() == pytest.approx(1 - 3.0 / (3.5 + 1e-5))
    x, y = torch.tensor([0.3]), torch.tensor([1.0])
    prob = torch.sigmoid(x)
    expected = 0.25 * (1 - prob) ** 2 * -torch.log(prob)
    assert sigmoid_focal_loss(x, y, 0.25, 2.0, "none").item() == pytest.approx(expected.item(), rel=1e-6)


def test_dynamic_mask_head_equals_grouped_convolution():
    head = DynamicMaskHead(8, 8, 3)
    assert head.num_params == 153 and head.weight_nums == [64, 64, 8] and head.bias_nums == [8, 8, 1]
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(8, 12, 16, generator=g)
    params = torch.randn(5, 153, generator=g)
    ours = head(feat, params)
    # official formulation: split [64, 64, 8 | 8, 8, 1], grouped 1x1 convs on the feature repeated per instance
    w0, w1, w2, b0, b1, b2 = torch.split(params, [64, 64, 8, 8, 8, 1], dim=1)
    x = feat[None].repeat(1, 5, 1, 1)
    x = F.relu(F.conv2d(x, w0.reshape(40, 8, 1, 1), b0.reshape(40), groups=5))
    x = F.relu(F.conv2d(x, w1.reshape(40, 8, 1, 1), b1.reshape(40), groups=5))
    ref = F.conv2d(x, w2.reshape(5, 8, 1, 1), b2.reshape(5), groups=5)[0]
    assert torch.allclose(ours, ref, atol=1e-5)
    windows = feat[None].expand(5, -1, -1, -1)
    assert torch.allclose(head.per_instance(windows, params), ref, atol=1e-5)
    assert head(feat, params, chunk=2).shape == (5, 12, 16)


def test_aligned_bilinear_reads_shifted_positions():
    ramp = torch.arange(5.0).view(1, 1, 5, 1).expand(1, 1, 5, 3).contiguous()
    out = aligned_bilinear(ramp, 4)[0, 0, :, 0]
    expected = torch.clamp(torch.clamp(torch.arange(20.0) - 2, min=0) / 4, max=4)
    assert out.shape == (20,) and torch.allclose(out, expected)


def test_roi_level_assignment():
    def box(size):
        return [0.0, 0.0, float(size), float(size)]

    boxes = torch.tensor([box(224), box(112), box(448), box(5000), box(10), box(0)])
    assert assign_levels(boxes, 2, 5, 224.0, 4).tolist() == [2, 1, 3, 3, 0, 0]


@pytest.mark.parametrize(
    "b, c, h, w, scale",
    [(2, 6, 23, 31, 1 / 8), (1, 3, 1, 1, 1 / 32), (3, 2, 5, 7, 1 / 4), (1, 4, 2, 40, 1 / 16)],
)
def test_roi_align_backward_equals_torchvision_kernel(b, c, h, w, scale):
    """Our sparse CPU backward against torchvision's own backward kernel (float64: same taps, same weights).

    Boxes reach past every border (samples within one cell outside clamp, further ones drop), some are
    degenerate (x2 < x1), and maps of one cell or row exercise the edge clamping.
    """
    g = torch.Generator().manual_seed(h * w)
    r = 60
    extent = torch.tensor([w / scale, h / scale])
    xy = torch.rand(r, 2, generator=g, dtype=torch.float64) * extent * 1.4 - 0.2 * extent
    wh = (torch.rand(r, 2, generator=g, dtype=torch.float64) - 0.1) * extent * 0.7
    rois = torch.cat([torch.randint(0, b, (r, 1), generator=g).double(), xy, xy + wh], 1)
    grad = torch.randn(r, c, 7, 7, generator=g, dtype=torch.float64)
    ref = torch.ops.torchvision._roi_align_backward(grad, rois, scale, 7, 7, b, c, h, w, 2, True)
    ours = roi_align_backward_sparse(grad, rois, scale, 2, (b, c, h, w))
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, rtol=0, atol=1e-12 * ref.abs().max().item())


def test_multilevel_roi_align_gradient_matches_torchvision():
    """The pooler's autograd (sparse CPU backward, all levels) against torchvision's differentiable roi_align."""
    from torchvision.ops import roi_align

    g = torch.Generator().manual_seed(0)
    pooler = MultiLevelRoIAlign([4, 8, 16, 32])
    feats = [
        torch.randn(2, 5, 64 // s, 96 // s, generator=g, dtype=torch.float64, requires_grad=True) for s in (1, 2, 4, 8)
    ]
    xy = torch.rand(2, 30, 2, generator=g, dtype=torch.float64) * 300
    boxes = torch.cat([xy, xy + torch.rand(2, 30, 2, generator=g, dtype=torch.float64) * 200 + 1], -1)
    weight = torch.randn(60, 5, 7, 7, generator=g, dtype=torch.float64)
    (pooler([f * 4 for f in feats], boxes) * weight).sum().backward()
    ours = [f.grad.clone() for f in feats]
    flat = boxes.reshape(-1, 4).float()
    levels = assign_levels(flat, 2, 5, 224.0, 4)
    rois = torch.cat([torch.arange(2).repeat_interleave(30)[:, None].float(), flat], 1).double()
    for f in feats:
        f.grad = None
    total = 0
    for lvl, (f, stride) in enumerate(zip(feats, (4, 8, 16, 32))):
        idx = torch.nonzero(levels == lvl).squeeze(1)
        total = total + (roi_align(f * 4, rois[idx], 7, 1 / stride, 2, True) * weight[idx]).sum()
    total.backward()
    for a, f in zip(ours, feats):
        assert torch.allclose(a, f.grad, rtol=0, atol=1e-12)


def test_gradient_sink_sums_the_stages_like_autograd():
    """Three poolings of one pyramid through a GradientSink (sparse products summed into one buffer per level) against
    the same poolings without it (one dense gradient per pooling, summed by autograd); a level no box reaches
    still gets its zero gradient, and a level also used outside the pooler keeps that gradient too, in that
    gradient's own (contiguous NCHW) layout rather than the sparse product's channels-last one."""
    g = torch.Generator().manual_seed(1)
    pooler = MultiLevelRoIAlign([4, 8, 16, 32])
    feats = [
        torch.randn(2, 3, 64 // s, 96 // s, generator=g, dtype=torch.float64, requires_grad=True) for s in (1, 2, 4, 8)
    ]
    stage_boxes = []
    for _ in range(3):  # boxes of 8..120 px: p5 (>= 448 px) gets none
        xy = torch.rand(2, 20, 2, generator=g, dtype=torch.float64) * 200
        stage_boxes.append(torch.cat([xy, xy + torch.rand(2, 20, 2, generator=g, dtype=torch.float64) * 112 + 8], -1))
    weights = [torch.randn(40, 3, 7, 7, generator=g, dtype=torch.float64) for _ in range(3)]

    layouts = []

    def loss(use_sink: bool) -> list[torch.Tensor]:
        for f in feats:
            f.grad = None
        sink = pooler.gradient_sink(feats) if use_sink else None
        assert (sink is not None) == use_sink
        base = [f * 1.0 for f in feats]  # non-leaf: the hook sees the gradient as the sink hands it back
        base[0].register_hook(lambda grad: layouts.append(grad.is_contiguous()))
        levels = sink.wrap(base) if sink is not None else base
        total = (levels[0] ** 2).sum()  # p2 is also used outside the pooler
        for boxes, w in zip(stage_boxes, weights):
            total = total + (pooler(levels, boxes, sink=sink) * w).sum()
        total.backward()
        return [f.grad.clone() for f in feats]

    plain, shared = loss(False), loss(True)
    for a, b in zip(plain, shared):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert shared[3].abs().max() == 0 and shared[0].abs().max() > 0
    assert layouts[1]  # with the sink (the plain path hands back the sparse product's channels-last layout)
    with torch.no_grad():
        assert pooler.gradient_sink(feats) is None  # nothing to back-propagate: plain pooling


def test_split_linear_gradients_match_finite_differences():
    """DynamicConv's parameter Linear + split (custom backward without the concatenation): forward equal to
    F.linear + split, gradients of x, weight and bias checked by finite differences, and an unused part
    (None gradient) contributes nothing."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3 * 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3 * 4, generator=g, dtype=torch.float64, requires_grad=True)
    parts = _SplitLinear.apply(x, weight, bias, 4)
    for got, want in zip(parts, F.linear(x, weight, bias).split(4, dim=1)):
        assert torch.equal(got, want)
    assert torch.autograd.gradcheck(lambda a, w, b: _SplitLinear.apply(a, w, b, 4), (x, weight, bias))
    first, _, third = _SplitLinear.apply(x, weight, bias, 4)
    (first.sum() + (third**2).sum()).backward()
    assert weight.grad[4:8].abs().max() == 0 and bias.grad[4:8].abs().max() == 0
    assert torch.allclose(bias.grad[:4], torch.full((4,), 7.0, dtype=torch.float64))


def test_federated_classes_keeps_present_and_samples_by_weight():
    gt_classes = torch.tensor([3, 3, 7, 10, 10])  # 10 = background (K = 10)
    weight = torch.zeros(10)
    weight[[1, 3, 5, 7]] = 1.0
    classes = federated_classes(gt_classes, 10, 5, weight, GeneratorNoise(0))
    assert set(classes.tolist()) == {3, 7, 10, 1, 5}  # present + every class with weight (the rest have 0)


class TestMatcher:
    def test_each_gt_takes_its_nearest_prediction(self):
        m = DynamicKMatcher(LossConfig())
        gt = torch.tensor([[10.0, 10.0, 30.0, 30.0], [60.0, 60.0, 90.0, 90.0]])
        pred = torch.tensor([[61.0, 59.0, 91.0, 88.0], [280.0, 280.0, 290.0, 290.0], [11.0, 9.0, 29.0, 31.0]])
        logits = torch.full((3, 4), -2.0)
        match = m(logits, pred, gt, torch.tensor([1, 2]), torch.tensor([300.0, 300.0, 300.0, 300.0]), keep_debug=True)
        assert match.selected.tolist() == [True, False, True]
        assert match.gt_indices.tolist() == [1, 0]
        assert match.fg_mask.tolist() == [True, False, True]

    def test_dynamic_k_truncates_and_conflicts_keep_the_cheapest_gt(self):
        m = DynamicKMatcher(LossConfig(ota_k=3))
        cost = torch.tensor([[1.0, 2.0], [3.0, 9.0], [4.0, 8.0], [9.0, 5.0]])
        ious = torch.tensor([[0.9, 0.7], [0.7, 0.1], [0.35, 0.1], [0.1, 0.5]])
        selected, gt_idx, per_gt, ks = m.assign(cost, ious)
        assert ks.tolist() == [1, 1]  # int(1.95) = 1, int(1.3) = 1: truncation
        # both GTs pick query 0; it keeps GT 0 (cheaper); GT 1 is re-assigned to its cheapest free query (3)
        assert selected.tolist() == [True, False, False, True] and gt_idx.tolist() == [0, 1]
        assert per_gt.tolist() == [0, 3]

    def test_stale_rematch_rows_quirk(self):
        cost = torch.tensor([[17.8, 8.2, 13.9], [11.8, 14.3, 6.6], [14.9, 3.0, 12.3], [3.2, 0.1, 2.0]])
        ious = torch.tensor(
            [[0.216, 0.911, 0.909], [0.450, 0.027, 0.079], [0.210, 0.088, 0.424], [0.061, 0.128, 0.008]]
        )
        # all GTs pick query 3, which keeps GT 1; GTs 0 and 2 both take query 1. The official loop resolves
        # conflicts on the rows that conflicted before it ({3}), so query 1 keeps both GTs.
        sel, gt_idx, _, _ = DynamicKMatcher(LossConfig()).assign(cost, ious)
        assert sel.tolist() == [False, True, False, True] and gt_idx.tolist() == [0, 1]
        sel, gt_idx, _, _ = DynamicKMatcher(LossConfig(stale_rematch_rows=False)).assign(cost, ious)
        assert sel.tolist() == [False, True, True, True] and gt_idx.tolist() == [2, 0, 1]

    def test_matcher_class_weight_scales_only_the_class_cost(self):
        gt = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
        pred = torch.tensor([[12.0, 11.0, 31.0, 29.0], [14.0, 12.0, 28.0, 33.0]])
        logits = torch.tensor([[0.0, 1.5], [-1.0, -3.0]])  # GT class 1: p = sigmoid(1.5), sigmoid(-3)
        whwh = torch.tensor([100.0, 100.0, 100.0, 100.0])
        args = (logits, pred, gt, torch.tensor([1]), whwh)
        base = DynamicKMatcher(LossConfig(class_weight=5.0)).cost_matrix(*args)[0]
        other = DynamicKMatcher(LossConfig(class_weight=5.0, matcher_class_weight=2.0)).cost_matrix(*args)[0]

        def focal_cost(x, a=0.25, g=2.0):  # closed form of the focal class cost at logit x
            p = 1 / (1 + math.exp(-x))
            return a * (1 - p) ** g * -math.log(p + 1e-8) - (1 - a) * p**g * -math.log(1 - p + 1e-8)

        expected = torch.tensor([[(2.0 - 5.0) * focal_cost(1.5)], [(2.0 - 5.0) * focal_cost(-3.0)]])
        torch.testing.assert_close(other - base, expected, rtol=1e-4, atol=1e-5)

    def test_no_gt_gives_empty_match(self):
        m = DynamicKMatcher(LossConfig())
        match = m(
            torch.zeros(4, 3), torch.rand(4, 4), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.ones(4)
        )
        assert not match.selected.any() and match.gt_indices.numel() == 0


def test_replay_noise_checks_kind_and_shape():
    noise = ReplayNoise([torch.zeros(2, 4)], ["randn"])
    with pytest.raises(RuntimeError, match="recorded shape"):
        noise.randn((3, 4))
    with pytest.raises(RuntimeError, match="recorded randn"):
        ReplayNoise([torch.zeros(2, 4)], ["randn"]).randint(0, 5, (2, 4))
    with pytest.raises(RuntimeError, match="exhausted"):
        ReplayNoise([]).randn((1,))
    a, b = GeneratorNoise(3), GeneratorNoise(3)
    assert torch.equal(a.randn((4,)), b.randn((4,))) and a.randint(0, 10, (3,)).dtype == torch.int64
