"""Weighted sums with normalisation, components kept for logging, truthful differentiable flag."""

import pytest
import torch

import rewards
from rewards.base import Reward
from rewards.combine import RunningNorm


class Mean(Reward):
    """Differentiable toy reward: scale * mean pixel."""

    name = "mean"
    differentiable = True

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = scale

    def forward(self, images, prompts):
        return self.scale * images.mean(dim=(1, 2, 3))


def test_weighted_sum_and_components():
    x = torch.rand(4, 3, 16, 16)
    parts_in = {"a": Mean(1.0), "b": Mean(3.0), "j": rewards.build("jpeg_incompressibility")}
    total, parts = rewards.weighted_sum(parts_in, x, [""] * 4, weights={"a": 2.0, "j": 0.1})
    m = x.mean(dim=(1, 2, 3))
    assert torch.allclose(parts["a"], m) and torch.allclose(parts["b"], 3 * m)
    assert torch.allclose(total, 2 * m + 3 * m + 0.1 * parts["j"])
    with pytest.raises(rewards.RewardError, match="unknown rewards"):
        rewards.weighted_sum(parts_in, x, [""] * 4, weights={"zz": 1.0})


def test_running_normalisation_matches_the_statistics_of_all_scores_seen():
    norm = RunningNorm(eps=0.0)
    seen = []
    for i in range(4):
        r = torch.randn(5) * (i + 1) + i
        seen.append(r)
        out = norm(r)
        allr = torch.cat(seen).double()
        assert torch.allclose(out.double(), (r.double() - allr.mean()) / allr.std(unbiased=False), atol=1e-5)


def test_combined_normalises_but_logs_raw_components():
    c = rewards.Combined({"a": Mean(1.0), "b": Mean(100.0)}, normalize={"b": ("fixed", 50.0, 100.0)})
    x = torch.rand(3, 3, 8, 8)
    total, parts = c.score(x, [""] * 3)
    m = x.mean(dim=(1, 2, 3))
    assert torch.allclose(total, m + (100 * m - 50) / 100)
    assert torch.allclose(parts["b"], 100 * m) and torch.allclose(c.last_components["b"], 100 * m)
    c2 = rewards.Combined({"a": Mean(1.0)}, normalize=4.0)
    assert torch.allclose(c2(x, [""] * 3), m / 4)
    with pytest.raises(rewards.RewardError, match="unknown reward normalisation"):
        rewards.Combined({"a": Mean()}, normalize="zscore-ish")


def test_combined_running_norm_uses_batch_stats_on_first_call():
    c = rewards.Combined({"a": Mean(1.0)}, normalize="running")
    x = torch.rand(6, 3, 8, 8)
    out = c(x, [""] * 6)
    assert abs(out.mean().item()) < 1e-5 and out.std(unbiased=False).item() == pytest.approx(1.0, rel=1e-3)


def test_differentiable_flag_is_truthful_for_mixes():
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    diff = rewards.Combined({"a": Mean(), "b": Mean(2.0)})
    assert diff.differentiable
    diff(x, ["", ""]).sum().backward()
    assert x.grad.abs().sum() > 0
    mixed = rewards.Combined({"a": Mean(), "j": rewards.build("jpeg_compressibility")})
    assert not mixed.differentiable
    assert not mixed(x, ["", ""]).requires_grad
    total, parts = mixed.score(x, ["", ""])
    assert parts["a"].requires_grad  # the components keep their own graphs for whoever wants them


class Linear(Reward):
    """A reward with a parameter (like a real reward model): w . mean pixel per channel."""

    name = "linear"
    differentiable = True

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(3, 1, bias=False)
        self.freeze()

    def forward(self, images, prompts):
        return self.head(images.mean(dim=(2, 3))).squeeze(1)


def test_raw_components_and_raw_total_leave_the_running_normaliser_alone():
    c = rewards.Combined({"a": Mean(2.0), "b": Mean(5.0)}, {"b": -0.5}, normalize={"a": "running"})
    x = torch.rand(4, 3, 8, 8)
    m = x.mean(dim=(1, 2, 3))
    before = {k: v.clone() for k, v in c.state_dict().items()}
    parts = c.components(x, [""] * 4)
    assert torch.allclose(parts["a"], 2 * m) and torch.allclose(parts["b"], 5 * m)
    assert torch.allclose(c.raw_total(parts), 2 * m - 0.5 * 5 * m)  # weighted, not normalised
    assert all(torch.equal(before[k], v) for k, v in c.state_dict().items())
    c.score(x, [""] * 4)
    assert c.state_dict()["a.count"].item() == 4  # score does update it


def test_state_round_trip_resumes_the_normalisation_and_holds_no_model_weights():
    c = rewards.Combined({"a": Mean(3.0), "w": Linear()}, normalize={"a": "running"})
    seen = [torch.rand(5, 3, 8, 8), torch.rand(3, 3, 8, 8)]
    for x in seen:
        c.score(x, [""] * len(x))
    assert set(c.state_dict()) == {"a.count", "a.mean", "a.m2"}  # no `w.head.weight`
    resumed = rewards.Combined({"a": Mean(3.0), "w": c.rewards["w"]}, normalize={"a": "running"})
    resumed.load_state_dict(c.state_dict())
    x = torch.rand(2, 3, 8, 8)
    r = 3 * x.mean(dim=(1, 2, 3)).double()
    scores = torch.cat([3 * s.mean(dim=(1, 2, 3)) for s in seen]).double()
    allr = torch.cat([scores, r])  # running stats include this batch (updated before normalising)
    expected = (r - allr.mean()) / (allr.std(unbiased=False) + 1e-6) + c.rewards["w"](x, None).double()
    assert torch.allclose(resumed.score(x, [""] * 2)[0].double(), expected, atol=1e-5)
    assert torch.allclose(c.score(x, [""] * 2)[0].double(), expected, atol=1e-5)


def test_non_differentiable_names_every_component_without_a_gradient():
    c = rewards.Combined(
        {
            "a": Mean(),
            "j": rewards.build("jpeg_compressibility"),
            "w": Linear(),
            "i": rewards.build("jpeg_incompressibility"),
        }
    )
    assert c.non_differentiable == ["j", "i"] and not c.differentiable
    assert rewards.Combined({"a": Mean(), "w": Linear()}).non_differentiable == []


def test_recording_keeps_every_score_call_until_take():
    c = rewards.Combined({"a": Mean(1.0), "b": Mean(2.0)}, {"a": 3.0}, record=True)
    xs = [torch.rand(2, 3, 8, 8), torch.rand(3, 3, 8, 8)]
    for x in xs:
        c.score(x, [""] * len(x))
    c.components(xs[0], [""] * 2)  # evaluation's raw scores are not recorded
    m = torch.cat([x.mean(dim=(1, 2, 3)) for x in xs])
    got = c.take()
    assert set(got) == {"total", "a", "b"} and not got["total"].requires_grad
    assert torch.allclose(got["total"], 3 * m + 2 * m) and torch.allclose(got["b"], 2 * m)
    assert c.take() == {}
    quiet = rewards.Combined({"a": Mean()})
    quiet.score(xs[0], [""] * 2)
    assert quiet.take() == {}


def test_a_plain_function_is_a_component_too():
    c = rewards.Combined({"a": Mean(1.0), "f": lambda images, prompts: 2 * images.mean(dim=(1, 2, 3))})
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(c(x, ["", ""]), 3 * x.mean(dim=(1, 2, 3)))
    assert c.non_differentiable == ["f"]  # nothing says the function keeps a gradient
