"""Paths that only a GPU would exercise, checked on the CPU (issue 17, items 1, 2, 4, 5, 8 and 9).

* DP-SGD's noise generator must be on the gradients' device (Opacus refuses a CPU generator for CUDA
  tensors);
* the loss modules' buffers (cross-entropy's class weights) must follow the network to its device
  (checked with the ``meta`` device standing in for CUDA);
* evaluation scores label maps, not full-volume one-hot tensors, with the same numbers;
* mixed precision: bfloat16 without a scaler where the GPU has it, else float16 with a kept GradScaler
  whose skipped steps are not counted (the GPU's capability injected);
* a sticky CUDA error fails its job and ends the worker, which the executor starts afresh (an injected
  error; the last test with real worker processes);
* "auto" never falls back to the CPU without saying why, the node reports the device its worker uses,
  and the doctor warns of a GPU that torch cannot use (torch's and the machine's probes injected).
"""

import math

import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric
from opacus.optimizers.optimizer import _generate_noise

import voxgrid
import voxgrid.nodes.worker.training as training
from voxgrid.nodes.worker.objective import LocalObjective
from voxgrid.nodes.worker.training import Trainer
from voxgrid.plan import build_network

TINY = dict(channels=(4, 8), strides=(2,), num_res_units=0, patch_size=(16, 16, 16), amp=False)
WEIGHTED = {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True, "weight": [0.5, 2.0, 3.0]}


# --- 1. DP-SGD's noise generator ---------------------------------------------------------------------
def test_dp_noise_generator_is_made_on_the_device_asked_and_seeded_from_os_entropy(monkeypatch):
    gen = training.dp_noise_generator(torch.device("cpu"))
    assert gen.device == torch.device("cpu")
    # Opacus draws the noise on the reference's device with this generator: both noise modes work.
    ref = torch.zeros(3, 4)
    assert _generate_noise(1.0, ref, generator=gen).shape == ref.shape
    assert _generate_noise(1.0, ref, generator=gen, secure_mode=True).shape == ref.shape

    made = []

    class FakeGenerator:  # no CUDA here: record what the helper asks torch for
        def __init__(self, device="cpu"):
            self.device = torch.device(device)
            self.seed = None
            made.append(self)

        def manual_seed(self, seed):
            self.seed = seed
            return self

    monkeypatch.setattr(torch, "Generator", FakeGenerator)
    a = training.dp_noise_generator(torch.device("cuda", 1))
    b = training.dp_noise_generator("cuda:1")
    assert made == [a, b]
    assert a.device == b.device == torch.device("cuda", 1)
    assert 0 <= a.seed < 2**63 and 0 <= b.seed < 2**63 and a.seed != b.seed  # OS entropy, not a fixed seed


def test_dp_sgd_hands_opacus_a_generator_on_the_parameters_device(monkeypatch):
    from opacus import optimizers

    asked, generators = [], []
    real_helper, real_optimizer = training.dp_noise_generator, optimizers.DPOptimizer

    def helper(device):
        asked.append(torch.device(device))
        return real_helper(device)

    class Spy(real_optimizer):
        def __init__(self, *args, **kwargs):
            generators.append(kwargs.get("generator"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(training, "dp_noise_generator", helper)
    monkeypatch.setattr(optimizers, "DPOptimizer", Spy)
    dp = {"mechanism": "dp_sgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5, "sample_rate": 1.0}
    plan = voxgrid.unet_plan(["background", "pancreas"], **{**TINY, "privacy": dp, "local_epochs": 1,
                                                            "steps_per_epoch": 1})
    torch.manual_seed(0)
    net = build_network(plan)
    start = {k: p.detach().clone() for k, p in net.named_parameters()}
    image = 0.1 * torch.randn(1, 16, 16, 16)
    label = torch.zeros(1, 16, 16, 16)
    image[:, 4:10, 4:10, 4:10] += 1.0
    label[:, 4:10, 4:10, 4:10] = 1.0
    data = [{"image": MetaTensor(image), "label": MetaTensor(label), "patient": p} for p in "AB"]
    loss, steps = Trainer(torch.device("cpu")).train(plan, net, data, seed=0, present={1})
    assert (loss, steps) == (None, 1)  # one real DP-SGD step, noise drawn with that generator
    assert asked == [torch.device("cpu")]
    assert len(generators) == 1 and generators[0].device == next(net.parameters()).device
    assert any(not torch.equal(start[k], p.detach()) for k, p in net.named_parameters())


def test_dp_sgd_refuses_parameters_on_several_devices():
    params = [torch.zeros(1), torch.zeros(1, device="meta")]
    with pytest.raises(ValueError, match="several devices"):
        training._params_device(params, torch.device("cpu"))
    assert training._params_device([], torch.device("cpu")) == torch.device("cpu")


# --- 2. the loss modules follow the network's device ---------------------------------------------------
def _buffers_on(objective: LocalObjective) -> list[torch.device]:
    losses = [objective.loss_fn, *objective.task_losses.values()]
    return [b.device for f in losses for b in f.buffers()]


@pytest.mark.parametrize("present", [{1, 2}, {2}])  # all classes annotated; a partial site (restricted weights)
def test_weighted_loss_buffers_follow_the_network_to_its_device(present):
    plan = voxgrid.unet_plan(["background", "pancreas", "tumor"], **{**TINY, "loss": WEIGHTED})
    net = build_network(plan).to("meta")
    objective = LocalObjective(plan, present, net)
    devices = _buffers_on(objective)
    assert devices and all(d.type == "meta" for d in devices)
    # the weighted cross-entropy runs on the network's device (a CPU weight against meta logits raises;
    # MONAI's Dice term calls .item(), which meta tensors cannot, so it is checked by its buffers only)
    ce = objective.loss_fn.cross_entropy
    n = ce.weight.numel()
    assert n == 1 + len(present)
    logits = torch.zeros(1, n, 4, 4, 4, device="meta")
    target = torch.zeros(1, 4, 4, 4, dtype=torch.long, device="meta")
    assert ce(logits, target).device.type == "meta"


def test_dtp_task_losses_follow_the_network_to_its_device():
    plan = voxgrid.unet_plan(["background", "pancreas", "tumor"], **{**TINY, "loss": WEIGHTED}).with_local(
        dtp={"alpha": 0.5, "gamma": 1.0})
    objective = LocalObjective(plan, {1, 2}, build_network(plan).to("meta"))
    assert len(objective.task_losses) == 2
    devices = _buffers_on(objective)
    assert devices and all(d.type == "meta" for d in devices)


def test_the_loss_stays_on_the_cpu_for_a_cpu_network():
    plan = voxgrid.unet_plan(["background", "pancreas", "tumor"], **{**TINY, "loss": WEIGHTED})
    objective = LocalObjective(plan, {1, 2}, build_network(plan))
    assert all(d.type == "cpu" for d in _buffers_on(objective))


# --- 5. evaluation on label maps ------------------------------------------------------------------------
LABELS5 = ["background", "liver", "spleen", "kidney", "absent"]


class Nearest(torch.nn.Module):
    """Pointwise 'network': logits favour the class nearest to the voxel's value (sliding-window safe)."""

    def __init__(self, n_cls: int):
        super().__init__()
        self.register_buffer("centres", torch.arange(n_cls, dtype=torch.float32).view(1, n_cls, 1, 1, 1))

    def forward(self, x):
        return -(x - self.centres) ** 2


def _volumes(n_cls: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, shape in enumerate([(20, 18, 16), (16, 20, 17), (18, 16, 16)]):
        label = torch.randint(0, n_cls - 1, shape, generator=g)  # the last class is never in the truth
        if i == 1:
            label[label == 3] = 0  # class 3 absent from this volume's truth (still predicted below)
        if i == 2:
            label[label == 2] = 1  # class 2 absent from the truth here...
        wrong = torch.rand(shape, generator=g) < 0.3
        noisy = torch.where(wrong, torch.randint(0, n_cls, shape, generator=g), label).float()
        if i == 2:
            noisy[noisy == 2] = 0  # ...and from the prediction: with ignore_empty False it scores 1
        image = noisy + 0.2 * (torch.rand(shape, generator=g) - 0.5)
        out.append({"image": MetaTensor(image[None]), "label": MetaTensor(label.float()[None])})
    return out


def _one_hot_reference(plan, net, data, present, ignore_empty):
    """The evaluation as it was: full-volume one-hot int64 prediction and label."""
    n_cls = len(plan.labels)
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=ignore_empty)
    for item in data:
        logits = sliding_window_inference(item["image"].as_tensor()[None], roi_size=plan.patch_size,
                                          sw_batch_size=plan.sw_batch_size, predictor=net,
                                          overlap=plan.sw_overlap, padding_mode="constant")
        pred = torch.nn.functional.one_hot(logits.float().argmax(1), n_cls).permute(0, 4, 1, 2, 3)
        gt = torch.nn.functional.one_hot(item["label"].as_tensor()[0].long(), n_cls)
        metric(y_pred=pred, y=gt.permute(3, 0, 1, 2)[None])
    raw = metric.aggregate()
    scores = raw.tolist()
    out = {}
    for c in range(1, n_cls):
        s = scores[c - 1]
        out[plan.labels[c]] = None if (c not in present or math.isnan(s)) else round(float(s), 6)
    return out, raw


@pytest.mark.parametrize("ignore_empty", [True, False])
def test_index_dice_equals_the_one_hot_reference_without_one_hot_volumes(monkeypatch, ignore_empty):
    plan = voxgrid.unet_plan(LABELS5, **{**TINY, "patch_size": (8, 8, 8)})
    net = Nearest(len(LABELS5))
    data = _volumes(len(LABELS5))
    present = {1, 2, 3, 4}
    expected, raw = _one_hot_reference(plan, net, data, present, ignore_empty)
    # never in the truth: all-NaN (ignore_empty) or all-0 per volume; MONAI's mean_batch gives 0 either way
    assert expected["absent"] == 0.0 and None not in expected.values()

    seen = []

    class Spy(DiceMetric):
        def __call__(self, y_pred, y, **kw):
            seen.append((tuple(y_pred.shape), y_pred.dtype, tuple(y.shape), y.dtype))
            return super().__call__(y_pred, y, **kw)

    def no_one_hot(*a, **k):
        raise AssertionError("evaluation must not one-hot encode full volumes")

    monkeypatch.setattr(training, "DiceMetric", Spy)
    monkeypatch.setattr(torch.nn.functional, "one_hot", no_one_hot)
    got = Trainer(torch.device("cpu")).evaluate(plan, net, data, present, ignore_empty=ignore_empty)
    assert got == expected
    # label maps (B, 1, X, Y, Z) of one byte per voxel reach the metric
    assert [s[0][1] for s in seen] == [1, 1, 1] and all(s[2][1] == 1 for s in seen)
    assert all(s[1] == torch.uint8 and s[3] == torch.uint8 for s in seen)
    # the raw per-class means agree exactly, not only after rounding
    monkeypatch.undo()
    index = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=ignore_empty,
                       num_classes=len(LABELS5))
    for item in data:
        logits = sliding_window_inference(item["image"].as_tensor()[None], roi_size=plan.patch_size,
                                          sw_batch_size=plan.sw_batch_size, predictor=net,
                                          overlap=plan.sw_overlap, padding_mode="constant")
        index(y_pred=logits.argmax(1, keepdim=True).to(torch.uint8),
              y=item["label"].as_tensor().to(torch.uint8)[None])
    assert torch.equal(index.aggregate(), raw)


def test_uint8_labels_a_classes_subset_and_a_node_sw_batch_cap_give_the_same_scores():
    plan = voxgrid.unet_plan(LABELS5, **{**TINY, "patch_size": (8, 8, 8), "sw_batch_size": 4})
    net = Nearest(len(LABELS5))
    data = _volumes(len(LABELS5), seed=1)
    expected, _ = _one_hot_reference(plan, net, data, {1, 3}, ignore_empty=True)
    assert expected["spleen"] is None and expected["liver"] is not None  # not annotated here: None
    as_uint8 = [{"image": d["image"], "label": MetaTensor(d["label"].as_tensor().to(torch.uint8))} for d in data]
    assert Trainer(torch.device("cpu")).evaluate(plan, net, as_uint8, {1, 3}) == expected
    assert Trainer(torch.device("cpu"), max_sw_batch_size=1).evaluate(plan, net, data, {1, 3}) == expected
    with pytest.raises(ValueError, match="max_sw_batch_size"):
        Trainer(torch.device("cpu"), max_sw_batch_size=0)


# --- 4. mixed precision -----------------------------------------------------------------------------------
def _no_probe():
    raise AssertionError("the GPU's capability is asked only for an amp plan on CUDA")


def test_precision_is_bfloat16_without_a_scaler_where_the_gpu_has_it_else_float16_with_one():
    cuda = torch.device("cuda")
    assert training.pick_precision(True, cuda, lambda: True) == training.Precision(torch.bfloat16, scaler=False)
    assert training.pick_precision(True, cuda, lambda: False) == training.Precision(torch.float16, scaler=True)
    for amp, device in ((False, cuda), (True, torch.device("cpu")), (True, "meta")):
        p = training.pick_precision(amp, device, _no_probe)
        assert p == training.Precision() and not p.autocast and not p.scaler  # float32 throughout


def test_the_float16_scaler_is_kept_from_job_to_job_and_bfloat16_has_none():
    import warnings

    plan = voxgrid.unet_plan(["background", "pancreas"], **{**TINY, "amp": True})
    assert Trainer(torch.device("cuda"), bf16_supported=lambda: True).scaler(plan) is None
    assert Trainer(torch.device("cpu"), bf16_supported=_no_probe).scaler(plan) is None
    fp16 = Trainer(torch.device("cuda"), bf16_supported=lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no CUDA here: torch disables the scaler it makes, with a warning
        first = fp16.scaler(plan)
        assert isinstance(first, torch.amp.GradScaler) and fp16.scaler(plan) is first  # its scale carries over
        other = voxgrid.unet_plan(["background", "pancreas"], **{**TINY, "amp": True, "local_epochs": 2})
        assert other.content_hash != plan.content_hash and fp16.scaler(other) is not first


def test_a_step_the_scaler_skips_is_reported_as_skipped_and_changes_nothing():
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    assert training.optimizer_step(opt, (p * float("inf")).sum(), scaler) is False  # non-finite gradient
    assert torch.equal(p.detach(), torch.ones(2)) and scaler.get_scale() == 2.0 ** 7
    opt.zero_grad()
    assert training.optimizer_step(opt, p.sum(), scaler) is True
    assert torch.allclose(p.detach(), torch.full((2,), 0.9))
    opt.zero_grad()
    assert training.optimizer_step(opt, p.sum(), None) is True  # float32 / bfloat16: no scaler


def _tiny_data():
    image = 0.1 * torch.randn(1, 16, 16, 16)
    label = torch.zeros(1, 16, 16, 16)
    image[:, 4:10, 4:10, 4:10] += 1.0
    label[:, 4:10, 4:10, 4:10] = 1.0
    return [{"image": MetaTensor(image), "label": MetaTensor(label), "patient": p} for p in "AB"]


@pytest.mark.parametrize("skip, steps", [({1, 3}, 2), ({0, 1, 2, 3}, 0)])
def test_training_counts_only_the_steps_done_and_their_loss(monkeypatch, skip, steps):
    plan = voxgrid.unet_plan(["background", "pancreas"], **{**TINY, "local_epochs": 1, "steps_per_epoch": 4})
    real, seen, losses = training.optimizer_step, [], []

    def step(opt, loss, scaler):  # stands in for the scaler's verdict
        i = len(seen)
        seen.append(i)
        if i in skip:
            return False
        losses.append(float(loss.detach()))
        return real(opt, loss, scaler)

    monkeypatch.setattr(training, "optimizer_step", step)
    torch.manual_seed(0)
    loss, done = Trainer(torch.device("cpu")).train(plan, build_network(plan), _tiny_data(), seed=0, present={1})
    assert len(seen) == 4 and done == steps
    assert (loss is None) if not losses else loss == pytest.approx(sum(losses) / len(losses))


# --- 8. a sticky CUDA error ends the worker ---------------------------------------------------------------
ADVICE = ("\nCUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace "
          "below might be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1")
STICKY = ["CUDA error: device-side assert triggered", "CUDA error: an illegal memory access was encountered",
          "CUDA error: unspecified launch failure", "cudaErrorLaunchFailure",
          "CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, opa, opb, m, n, k)`"]


@pytest.mark.parametrize("text", STICKY)
@pytest.mark.parametrize("kind", [torch.AcceleratorError, RuntimeError])
def test_sticky_cuda_errors_are_recognised(kind, text):
    from voxgrid.nodes.worker.devices import is_sticky_cuda_error

    assert is_sticky_cuda_error(kind(text + ADVICE))
    try:  # raised again as another error (a wrapper of the job's): the cause still counts
        try:
            raise kind(text)
        except RuntimeError as exc:
            raise ValueError("the job failed") from exc
    except ValueError as wrapped:
        assert is_sticky_cuda_error(wrapped)


@pytest.mark.parametrize("exc", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                 RuntimeError("CUDA error: out of memory"), ValueError("CUDA error in the plan"),
                                 RuntimeError("mat1 and mat2 shapes cannot be multiplied"), KeyError("CUDA error")])
def test_other_errors_are_not_sticky(exc):
    from voxgrid.nodes.worker.devices import is_sticky_cuda_error

    assert not is_sticky_cuda_error(exc)


def _run_job(job_id: str):
    from voxgrid.nodes.worker.messages import parse_job

    plan = voxgrid.unet_plan(["background", "pancreas"], **TINY)
    return parse_job({"job_id": job_id, "dataset": {"label_names": {1: "pancreas"}, "volumes": [], "fingerprint": "f"},
                      "request": {"experiment_id": "e", "round": 0, "dataset": "ct", "plan": plan.model_dump(mode="json"),
                                  "plan_hash": plan.content_hash, "weights_id": "0" * 64}})


def _stand_in_runner(device: str, errors: dict):
    """A JobRunner whose job function is a stand-in: raises ``errors[job_id]`` or returns metrics and an update."""
    from types import SimpleNamespace

    from voxgrid.nodes.worker.runner import JobRunner
    from voxgrid.wire import Metrics

    class StandIn(JobRunner):
        def run(self, job, blob):
            if job.job_id in errors:
                raise errors[job.job_id]
            return Metrics(steps=1, device=self.trainer.device.type), b"update:" + blob

    return StandIn(SimpleNamespace(device=torch.device(device)), None, None)


def test_the_runner_fails_a_sticky_job_clearly_asks_to_exit_and_releases_memory_between_jobs(monkeypatch):
    from voxgrid.nodes.worker.messages import JobDone, JobFailed

    released = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: released.append(1))
    runner = _stand_in_runner("cuda", {"bad": ValueError("no such label"),
                                       "oom": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB"),
                                       "sticky": torch.AcceleratorError(STICKY[1] + ADVICE)})
    done, update = runner.attempt(_run_job("ok"), b"w")
    assert isinstance(done, JobDone) and done.has_update and update == b"update:w" and len(released) == 1
    for job_id, error in (("bad", "ValueError: no such label"), ("oom", "OutOfMemoryError: CUDA out of memory")):
        failed, update = runner.attempt(_run_job(job_id), b"w")
        assert isinstance(failed, JobFailed) and not failed.worker_exits and update is None
        assert failed.error.startswith(error)
    assert len(released) == 3  # after every job that leaves the context usable
    failed, update = runner.attempt(_run_job("sticky"), b"w")
    assert isinstance(failed, JobFailed) and failed.worker_exits and update is None
    assert "CUDA context cannot be used again" in failed.error and "illegal memory access" in failed.error
    assert "restarts its executor" in failed.error and "CUDA_LAUNCH_BLOCKING" not in failed.error
    assert len(released) == 3  # not on a broken context
    cpu = _stand_in_runner("cpu", {})
    assert isinstance(cpu.attempt(_run_job("ok"), b"w")[0], JobDone) and len(released) == 3  # nothing on the CPU


def test_the_worker_loop_reports_the_sticky_failure_then_exits_and_runs_nothing_more():
    import multiprocessing as mp

    from voxgrid.nodes.worker.messages import JobDone, JobFailed, JobStarted, recv_event, send
    from voxgrid.nodes.worker.runner import EXIT_DEVICE_BROKEN, serve

    server, worker = mp.Pipe()
    for job_id in ("ok", "sticky", "after"):
        send(server, _run_job(job_id), b"w")
    codes = []
    serve(worker, _stand_in_runner("cuda", {"sticky": RuntimeError(STICKY[0])}), exit=codes.append)
    assert codes == [EXIT_DEVICE_BROKEN]
    events = [recv_event(server) for _ in range(4)]
    assert [type(e) for e in events] == [JobStarted, JobDone, JobStarted, JobFailed]
    assert [e.job_id for e in events] == ["ok", "ok", "sticky", "sticky"] and events[3].worker_exits
    assert not server.poll(0.2)  # "after" was never started: the next worker takes it


def sticky_worker(conn, *args):
    """Runs in the executor's worker process: the real worker loop, with a job function that fails
    jobs named sticky-* with a CUDA error that breaks the context, and finishes the others at once."""
    from voxgrid.nodes.worker import runner
    from voxgrid.wire import Metrics

    def run(self, job, blob):
        if job.job_id.startswith("sticky"):
            raise torch.AcceleratorError(STICKY[1] + ADVICE)
        return Metrics(steps=1, device=self.trainer.device.type), None

    runner.JobRunner.run = run
    runner.worker_main(conn, *args)


def test_the_executor_restarts_a_worker_that_exits_after_a_sticky_error_and_runs_the_next_job(monkeypatch):
    import threading

    from voxgrid.nodes.service import executor as executor_module
    from voxgrid.nodes.worker.messages import JobDone, JobFailed
    from voxgrid.nodes.worker.runner import EXIT_DEVICE_BROKEN

    monkeypatch.setattr(executor_module, "worker_main", sticky_worker)
    ended, cv = {}, threading.Condition()

    def on_event(event):
        with cv:
            if isinstance(event, (JobDone, JobFailed)):
                ended[event.job_id] = event
            cv.notify_all()

    ex = executor_module.Executor(on_event, device="auto", threads=1)
    try:
        assert ex.ready.wait(120)
        from voxgrid.nodes.worker.devices import probe_torch

        auto = "cuda" if probe_torch().usable else "cpu"  # scripts/gpu_check.py runs this on a GPU too
        assert ex.worker_device == auto  # what "auto" became in the worker
        first = ex._proc
        for job_id in ("sticky-1", "next-1", "next-2"):  # queued together: none may go to the leaving worker
            ex.submit({**_run_job(job_id).model_dump(mode="json"), "scientist": "alice"}, b"w")
        with cv:
            assert cv.wait_for(lambda: len(ended) == 3, 180), ended
        failed = ended["sticky-1"]
        assert isinstance(failed, JobFailed) and failed.worker_exits and "illegal memory access" in failed.error
        assert all(isinstance(ended[j], JobDone) for j in ("next-1", "next-2")), ended  # none lost in the restart
        assert first.exitcode == EXIT_DEVICE_BROKEN and ex._proc is not first and ex._proc.is_alive()
        assert ex.worker_device == auto
    finally:
        ex.close()


# --- 9. no silent CPU ------------------------------------------------------------------------------------
def _probe(cuda_version, available, count=0, names=()):
    from voxgrid.nodes.worker.devices import CudaProbe

    return lambda: CudaProbe("2.13.0", cuda_version, available, count, names)


CPU_BUILD, NO_DEVICE, ONE_GPU = _probe(None, False), _probe("12.8", False), _probe("12.8", True, 1, ("NVIDIA H200",))


@pytest.mark.parametrize("probe, host, says", [
    (CPU_BUILD, False, ["CPU-only build", "torch.version.cuda is None"]),
    (CPU_BUILD, True, ["CPU-only build", "NVIDIA GPU", "CUDA wheel", "download.pytorch.org"]),
    (NO_DEVICE, False, ["CUDA 12.8", "sees no CUDA device", "no NVIDIA GPU"]),
    (NO_DEVICE, True, ["sees no CUDA device", "CUDA_VISIBLE_DEVICES", "nvidia-smi"]),
])
def test_auto_falls_back_to_the_cpu_only_with_a_warning_saying_why(probe, host, says):
    from voxgrid.nodes.worker.devices import resolve_device

    warned = []
    assert resolve_device("auto", probe, lambda: host, lambda fmt, *a: warned.append(fmt % a)) == "cpu"
    assert len(warned) == 1 and all(s in warned[0] for s in says), warned
    assert "jobs run on the CPU" in warned[0]


def test_auto_takes_a_usable_gpu_and_a_set_device_is_not_probed(caplog):
    from voxgrid.nodes.worker.devices import resolve_device

    warned = []
    assert resolve_device("auto", ONE_GPU, _no_probe, warned.append) == "cuda" and not warned
    assert resolve_device("cuda:1", _no_probe, _no_probe, warned.append) == "cuda:1" and not warned
    # through the trainer's helper, into the executor's log
    with caplog.at_level("WARNING", logger="voxgrid.executor"):
        assert training.pick_device("auto", probe=CPU_BUILD, host_gpu=lambda: True) == torch.device("cpu")
    assert "CPU-only build" in caplog.text and "CUDA wheel" in caplog.text


def test_the_machines_gpu_is_found_by_its_driver_or_nvidia_smi():
    from voxgrid.nodes.worker.devices import NVIDIA_DRIVER_FILE, host_has_nvidia_gpu

    assert host_has_nvidia_gpu(lambda p: p == NVIDIA_DRIVER_FILE, lambda name: None)
    assert host_has_nvidia_gpu(lambda p: False, lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None)
    assert not host_has_nvidia_gpu(lambda p: False, lambda name: None)


def test_the_node_reports_the_device_its_worker_uses(tmp_path):
    from homes import node_home

    from voxgrid.nodes.service.home import Home
    from voxgrid.nodes.service.node import NodeService

    class ReadyExecutor:
        worker_device = None

        def close(self):
            pass

    node_home(tmp_path)
    service = NodeService(Home(tmp_path / "home"), start_executor=False)
    try:
        service.executor = ReadyExecutor()
        assert service.config.device == "auto"
        from voxgrid.nodes.worker.devices import probe_torch

        assert service.info().device == ("cuda" if probe_torch().usable else "cpu")  # not ready yet: this process's view
        for reported in ("cuda", "cpu"):  # once ready: the worker's word, whatever this process would derive
            service.executor.worker_device = reported
            assert service.executor_device() == reported and service.info().device == reported
    finally:
        service.close()


@pytest.mark.parametrize("device, probe, host, status, says", [
    ("auto", CPU_BUILD, True, "warn", ["NVIDIA GPU", "jobs would run on the CPU", "CPU-only build", "CUDA wheel"]),
    ("auto", NO_DEVICE, True, "warn", ["jobs would run on the CPU", "sees no CUDA device", "CUDA_VISIBLE_DEVICES"]),
    ("auto", CPU_BUILD, False, "ok", ["no GPU on this machine", "jobs run on the CPU"]),
    ("auto", NO_DEVICE, False, "ok", ["no GPU on this machine", "jobs run on the CPU"]),
    ("auto", ONE_GPU, True, "ok", ["1 CUDA device(s): NVIDIA H200 (device auto)"]),
    ("cuda:0", CPU_BUILD, True, "fail", ["'cuda:0' configured", "CPU-only build", "CUDA wheel"]),
    ("cuda", NO_DEVICE, False, "fail", ["'cuda' configured", "sees no CUDA device"]),
    ("cpu", CPU_BUILD, True, "ok", ["device 'cpu' configured: jobs run on the CPU"]),
])
def test_the_doctor_warns_of_a_gpu_that_torch_cannot_use(device, probe, host, status, says):
    from types import SimpleNamespace

    from voxgrid.nodes.ops.doctor import check_gpu

    c = check_gpu(SimpleNamespace(device=device), probe=probe, host_gpu=lambda: host)
    assert c.name == "gpu" and c.status == status, c
    assert all(s in c.reason for s in says), c.reason
