"""Every supported loss configuration: ``name -> (loss_fn, output, target)`` in float64."""

from __future__ import annotations

import torch
from torch import nn

N, C = 4, 3


def loss_cases() -> dict[str, tuple[nn.Module, tuple[int, ...], torch.Tensor]]:
    """``name -> (loss_fn, output shape, target)``."""
    g = torch.Generator().manual_seed(1)
    cls = torch.randint(0, C, (N,), generator=g)
    cls_seq = torch.randint(0, C, (N, 2), generator=g)
    ignore = cls.clone()
    ignore[1] = -100
    ignore_seq = cls_seq.clone()
    ignore_seq[0, 1] = 7
    probs = torch.rand(N, C, generator=g, dtype=torch.float64).softmax(-1)
    weight = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    cases = {}
    for red in ("mean", "sum"):
        cases[f"mse-{red}"] = (
            nn.MSELoss(reduction=red),
            (N, C),
            torch.randn(N, C, generator=g, dtype=torch.float64),
        )
        cases[f"mse-seq-{red}"] = (
            nn.MSELoss(reduction=red),
            (N, 2, C),
            torch.randn(N, 2, C, generator=g, dtype=torch.float64),
        )
        cases[f"ce-{red}"] = (nn.CrossEntropyLoss(reduction=red), (N, C), cls)
        cases[f"ce-weight-{red}"] = (nn.CrossEntropyLoss(weight=weight, reduction=red), (N, C), cls)
        cases[f"ce-ignore-{red}"] = (nn.CrossEntropyLoss(reduction=red), (N, C), ignore)
        cases[f"ce-smooth-{red}"] = (
            nn.CrossEntropyLoss(label_smoothing=0.2, reduction=red),
            (N, C),
            cls,
        )
        cases[f"ce-all-options-seq-{red}"] = (
            nn.CrossEntropyLoss(weight=weight, ignore_index=7, label_smoothing=0.1, reduction=red),
            (N, C, 2),
            ignore_seq,
        )
        cases[f"ce-probs-{red}"] = (nn.CrossEntropyLoss(reduction=red), (N, C), probs)
        cases[f"ce-probs-weight-smooth-{red}"] = (
            nn.CrossEntropyLoss(weight=weight, label_smoothing=0.3, reduction=red),
            (N, C),
            probs,
        )
        cases[f"ce-seq-{red}"] = (nn.CrossEntropyLoss(reduction=red), (N, C, 2), cls_seq)
        binary = (torch.rand(N, C, generator=g) > 0.5).double()
        cases[f"bce-{red}"] = (nn.BCEWithLogitsLoss(reduction=red), (N, C), binary)
        cases[f"bce-weight-{red}"] = (
            nn.BCEWithLogitsLoss(
                weight=torch.rand(C, generator=g, dtype=torch.float64) + 0.5, reduction=red
            ),
            (N, C),
            binary,
        )
        cases[f"bce-posweight-{red}"] = (
            nn.BCEWithLogitsLoss(
                pos_weight=torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64), reduction=red
            ),
            (N, C),
            binary,
        )
    return cases
