"""The training loop's seams for new methods: extra logged scalars, before/after-step hooks (gradient
surgery, EMA teacher) that know whether the non-finite guard skipped an update, and the per-iteration
weight-decay schedule. Tiny models on CPU."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

from conftest import tiny_pretrain_flags
from util.loop import Optimization, train_epoch
from util.lr_sched import apply_weight_decay, cosine_scheduler, cosine_wd
from util.optim import param_groups_weight_decay

CPU = torch.device("cpu")


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


def tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 4, generator=g) for _ in range(n)]


def loss_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).pow(2).mean()


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()]).clone()


class CountHostReads:
    """Counts `.item()` / `bool(tensor)` calls (the host syncs the loop must avoid per step)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.n = 0
        item, to_bool = torch.Tensor.item, torch.Tensor.__bool__

        def counted_item(t):
            self.n += 1
            return item(t)

        def counted_bool(t):
            self.n += 1
            return to_bool(t)
        monkeypatch.setattr(torch.Tensor, "item", counted_item)
        monkeypatch.setattr(torch.Tensor, "__bool__", counted_bool)


# ---- after_step: EMA teacher ---------------------------------------------------------------------------

@pytest.mark.parametrize("fused", [True, False], ids=["fused-device-skip", "host-sync-fallback"])
def test_ema_after_step_not_applied_on_skipped_step(fused, monkeypatch):
    student = tiny()
    teacher = copy.deepcopy(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2, fused=fused)
    opt = Optimization(optimizer, "none", max_nonfinite=10)
    opt.poison_steps = {1}  # the second update's loss becomes NaN
    stepped_seen: list[torch.Tensor] = []

    def ema(model: nn.Module, stepped: torch.Tensor) -> None:
        assert not torch.is_grad_enabled()
        stepped_seen.append(stepped)
        for t, s in zip(teacher.parameters(), model.parameters()):
            t.lerp_(s, 0.5 * stepped)

    opt.after_step = ema  # attached after construction, as an engine would
    if fused:
        reads = CountHostReads(monkeypatch)
    for k, x in enumerate(batches(3)):
        s_before, t_before = flat(student), flat(teacher)
        opt.step(loss_of(student, x), student, k)
        s_after, t_after = flat(student), flat(teacher)
        if k == 1:  # skipped: neither the student nor the teacher moves
            assert torch.equal(s_after, s_before) and torch.equal(t_after, t_before)
        else:
            assert not torch.equal(s_after, s_before)
            assert torch.allclose(t_after, t_before + 0.5 * (s_after - t_before), atol=1e-7)
    if fused:  # the hook and its `stepped` flag add no host sync to the fused path
        assert reads.n == 0
        monkeypatch.undo()
    assert [float(s) for s in stepped_seen] == [1.0, 0.0, 1.0]
    assert all(s.dim() == 0 for s in stepped_seen)
    opt.check()
    assert opt.skipped_steps == 1


def test_stepped_follows_grad_scaler_skip():
    """With a grad scaler the update is skipped when the scaler's own `found_inf` says so, even if the
    loop's guard saw finite values; `stepped` reports that decision (and before_step runs after
    `unscale_`, when the scaler's flags exist)."""
    student = tiny()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    opt = Optimization(optimizer, "none")
    opt.scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    seen: list[float] = []

    def scaler_says_inf(model: nn.Module) -> None:
        state = opt.scaler._per_optimizer_states[id(optimizer)]
        for found in state["found_inf_per_device"].values():
            found.fill_(1.0)

    opt.after_step = lambda m, stepped: seen.append(float(stepped))
    x1, x2 = batches(2)
    before = flat(student)
    opt.before_step = scaler_says_inf
    opt.step(loss_of(student, x1), student, 0)
    assert torch.equal(flat(student), before) and seen == [0.0]
    opt.before_step = None
    opt.step(loss_of(student, x2), student, 1)
    assert not torch.equal(flat(student), before) and seen == [0.0, 1.0]


# ---- before_step: once per update, after unscale, before the clip ------------------------------------

def test_before_step_once_per_update_after_unscale_before_clip():
    model = tiny()
    reference = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    opt = Optimization(optimizer, "none", accum_iter=2, clip_grad=1.0)
    opt.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    xs = batches(4)
    # Gradient of the first accumulation group, unscaled: mean of the two micro-batch losses.
    ((loss_of(reference, xs[0]) + loss_of(reference, xs[1])) / 2).backward()
    expected = [p.grad.clone() for p in reference.parameters()]
    calls: list[int] = []
    head_before = flat(model.head)

    def surgery(m: nn.Module) -> None:
        calls.append(opt.update_count)
        if len(calls) == 1:
            for p, g in zip(m.parameters(), expected):
                assert torch.allclose(p.grad, g, rtol=1e-5, atol=1e-7)  # unscaled, both micro-batches in
        for p in m.head.parameters():  # iBOT-style: no update for the head
            p.grad = None
        for p in m.body.parameters():  # the global clip sees these gradients
            p.grad.mul_(1e6)

    opt.before_step = surgery
    norms = [opt.step(loss_of(model, x), model, k) for k, x in enumerate(xs)]
    assert calls == [1, 2]  # once per update, not per micro-batch
    assert norms[0] is None and norms[2] is None
    assert float(norms[1]) > 1e3 and float(norms[3]) > 1e3  # clip ran after the hook scaled the gradients
    assert torch.equal(flat(model.head), head_before)  # its gradients were removed before the step


# ---- extra scalars ---------------------------------------------------------------------------------------

class RecordingLogger:
    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, float], int]] = []

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        self.calls.append((dict(values), step))


def scalar_forward(model: nn.Module, x: torch.Tensor):
    loss = loss_of(model, x)
    return loss, {"twice": 2 * loss, "input_mean": x.mean(), "const": 1.5}


def test_extra_scalars_are_averaged_logged_and_resumed():
    xs = batches(6)
    log = RecordingLogger()
    model = tiny()
    opt = Optimization(torch.optim.AdamW(model.parameters(), lr=1e-2), "none")
    stats = train_epoch(model, xs, opt, 0, CPU, scalar_forward, lambda e: 1e-2, log, print_freq=2,
                        steps_per_epoch=6)
    assert stats["const"] == 1.5
    assert stats["input_mean"] == pytest.approx(float(torch.stack([x.mean() for x in xs]).mean()), rel=1e-6)
    assert stats["twice"] == pytest.approx(2 * stats["loss"], rel=1e-9)
    assert {"loss", "lr", "skipped_steps"} <= set(stats) and "wd" not in stats
    for values, _ in log.calls:
        assert {"train_loss", "train_twice", "train_input_mean", "train_const", "lr"} == set(values)
        assert values["train_twice"] == pytest.approx(2 * values["train_loss"], rel=1e-9)
    # window means: steps {0}, {1, 2}, {3, 4}, {5}
    assert [s for _, s in log.calls] == [0, 333, 666, 833]
    assert log.calls[1][0]["train_input_mean"] == pytest.approx(float((xs[1].mean() + xs[2].mean()) / 2), rel=1e-6)

    # Resume after 4 steps from the loop state a checkpoint would hold: same epoch means.
    model2 = tiny()
    opt2 = Optimization(torch.optim.AdamW(model2.parameters(), lr=1e-2), "none")
    states: dict[int, dict] = {}
    train_epoch(model2, xs[:4], opt2, 0, CPU, scalar_forward, lambda e: 1e-2, print_freq=2, steps_per_epoch=6,
                on_update=lambda step, state_fn, stop: states.__setitem__(step, state_fn()))
    state = json.loads(json.dumps(states[4]))  # plain Python values, as stored in a checkpoint
    assert set(state["scalar_sums"]) == {"twice", "input_mean", "const"} and state["steps_done"] == 4
    resumed = train_epoch(model2, xs[4:], opt2, 0, CPU, scalar_forward, lambda e: 1e-2, print_freq=2,
                          start_step=4, steps_per_epoch=6, loop_state=state)
    for k in ("loss", "twice", "input_mean", "const"):
        assert resumed[k] == pytest.approx(stats[k], rel=1e-12), k


def test_extra_scalars_add_no_per_step_host_sync(monkeypatch):
    def reads(steps: int) -> int:
        model = tiny()
        optimizer = torch.optim.AdamW(param_groups_weight_decay(model, 0.05), lr=1e-2, fused=True)
        opt = Optimization(optimizer, "none")
        counter = CountHostReads(monkeypatch)
        try:
            train_epoch(model, batches(steps), opt, 0, CPU, scalar_forward, lambda e: 1e-2, print_freq=1000,
                        steps_per_epoch=steps, wd_fn=lambda e: cosine_wd(e, 0.04, 0.4, 1))
        finally:
            monkeypatch.undo()
        return counter.n
    assert reads(12) == reads(2)


def test_reserved_scalar_name_is_refused():
    model = tiny()
    opt = Optimization(torch.optim.AdamW(model.parameters(), lr=1e-2), "none")
    with pytest.raises(ValueError, match="lr"):
        train_epoch(model, batches(1), opt, 0, CPU, lambda m, x: (loss_of(m, x), {"lr": 1.0}), lambda e: 1e-2)


def test_extra_scalars_reach_log_txt_in_a_pretraining_run(synthetic_fundus_tree, tmp_path, monkeypatch):
    import engine_pretrain
    import main_pretrain
    real = engine_pretrain.pretrain_forward

    def with_scalars(*args, **kwargs):
        loss = real(*args, **kwargs)
        return loss, {"loss_x3": 3 * loss, "one": torch.ones(())}
    monkeypatch.setattr(engine_pretrain, "pretrain_forward", with_scalars)
    out = tmp_path / "run"
    args = main_pretrain.get_args_parser().parse_args(
        tiny_pretrain_flags(synthetic_fundus_tree, epochs=1, vis_images=0, save_freq=0) + ["--output_dir", str(out)])
    main_pretrain.main(args)
    records = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert len(records) == 1
    assert records[0]["train_one"] == 1.0
    assert records[0]["train_loss_x3"] == pytest.approx(3 * records[0]["train_loss"], rel=1e-6)  # float32 products


# ---- weight-decay schedule -------------------------------------------------------------------------------

def test_cosine_wd_matches_the_array_scheduler():
    per_iter = cosine_scheduler(0.04, 0.4, 3, 5)
    got = [cosine_wd(it / 5, 0.04, 0.4, 3) for it in range(15)]
    assert got == pytest.approx(list(per_iter), rel=1e-12)
    assert cosine_wd(3.0, 0.04, 0.4, 3) == pytest.approx(0.4)


def test_weight_decay_schedule_sets_decayed_groups_per_update():
    model = tiny()
    groups = param_groups_weight_decay(model, 0.05)  # [no-decay (biases), decay (weights)]
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    opt = Optimization(optimizer, "none", accum_iter=2)
    seen: list[list[float]] = []

    def forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        seen.append([g["weight_decay"] for g in optimizer.param_groups])
        return loss_of(m, x)

    log = RecordingLogger()
    steps, epochs = 8, 2
    wd_fn = lambda e: cosine_wd(e, 0.04, 0.4, epochs)  # noqa: E731
    stats = {}
    for epoch in range(epochs):
        stats = train_epoch(model, batches(steps, seed=epoch), opt, epoch, CPU, forward, lambda e: 1e-2, log,
                            print_freq=4, steps_per_epoch=steps, wd_fn=wd_fn)
    # one schedule value per update (every 2 micro-batches), indexed by the update's first micro-batch
    expected = [cosine_wd(e + 2 * (k // 2) / steps, 0.04, 0.4, epochs) for e in range(epochs) for k in range(steps)]
    assert [s[0] for s in seen] == [0.0] * len(expected)  # the no-decay group stays at 0
    assert [s[1] for s in seen] == pytest.approx(expected, rel=1e-12)
    assert stats["wd"] == pytest.approx(expected[-1])
    assert all("wd" in values for values, _ in log.calls)
    assert [g["initial_weight_decay"] for g in optimizer.param_groups] == [0.0, 0.05]
    # A resumed optimizer (state dict round trip) keeps the decayed / not-decayed split.
    fresh = torch.optim.AdamW(param_groups_weight_decay(tiny(), 0.05), lr=1e-2)
    fresh.load_state_dict(optimizer.state_dict())
    apply_weight_decay(fresh, 0.3)
    assert [g["weight_decay"] for g in fresh.param_groups] == [0.0, 0.3]
