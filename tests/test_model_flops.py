"""The FLOP accounting behind the training-speed floor (benchmarks/model_flops.py), against closed-form counts.

The benchmark's claim (how much arithmetic an R50 training iteration is, and so the fastest it can be on a
given machine) rests on this counter: dense products by their shapes, RoIAlign's sparse backward product by
its non-zeros (torch's own counter would charge it as a dense product), and convolution gradients by what
their output mask asks for.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from model_flops import OpTimer


def test_dense_products_and_convolutions_are_counted_by_their_shapes():
    a, b, bias = torch.randn(4, 5), torch.randn(5, 6), torch.randn(6)
    x, w = torch.randn(1, 3, 8, 10, requires_grad=True), torch.randn(7, 3, 3, 3, requires_grad=True)
    acc = torch.zeros(4, 6)
    timer = OpTimer()
    with timer:
        a @ b
        torch.addmm(bias, a, b)
        acc.addmm_(a, b)  # in place: not in torch's registry, counted by the benchmark itself
        torch.bmm(a.expand(3, 4, 5), b.expand(3, 5, 6))
        y = F.conv2d(x, w, padding=1)
        y.sum().backward()
    assert timer.flops["matmul"] == 3 * (2 * 4 * 5 * 6) + 3 * (2 * 4 * 5 * 6)
    conv = 2 * 7 * 3 * 9 * 8 * 10  # multiply-adds per output element x output elements
    assert timer.flops["conv_forward"] == conv
    assert timer.flops["conv_backward"] == 2 * conv  # input and weight gradients
    assert set(timer.seconds) >= {"matmul", "conv_forward", "conv_backward"}


def test_a_frozen_input_costs_its_convolution_only_the_weight_gradient():
    x, w = torch.randn(1, 3, 8, 10), torch.randn(7, 3, 3, 3, requires_grad=True)
    timer = OpTimer()
    with timer:
        F.conv2d(x, w, padding=1).sum().backward()
    assert timer.flops["conv_backward"] == 2 * 7 * 3 * 9 * 8 * 10


def test_a_sparse_product_is_counted_by_its_non_zeros():
    idx = torch.tensor([[0, 2, 5, 5], [1, 0, 3, 7]])
    sparse = torch.sparse_coo_tensor(idx, torch.ones(4), (6, 8), check_invariants=True).coalesce()
    dense, out = torch.randn(8, 16), torch.zeros(6, 16)
    timer = OpTimer()
    with timer:
        torch.addmm(out, sparse, dense)
        torch.sparse.mm(sparse, dense)
    assert timer.flops["sparse_product"] == 2 * (2 * 4 * 16)
    assert "matmul" not in timer.flops  # torch's counter would have charged 2 x (2 x 6 x 8 x 16) as dense


def test_flops_are_split_by_the_phase_they_ran_in():
    x, w = torch.randn(1, 3, 8, 10), torch.randn(7, 3, 3, 3, requires_grad=True)
    timer = OpTimer()
    with timer:
        with timer.phase("forward"):
            loss = F.conv2d(x, w, padding=1).sum()
        with timer.phase("backward"):
            loss.backward()
    conv = 2 * 7 * 3 * 9 * 8 * 10
    assert timer.phase_flops["forward"]["conv_forward"] == conv
    assert timer.phase_flops["backward"]["conv_backward"] == conv  # weight gradient only: x needs none
    assert "conv_backward" not in timer.phase_flops["forward"]
