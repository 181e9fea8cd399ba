"""Device choice: a simulator, or a device far slower than the others, is never what `--backend auto`
serves on, and `--list-devices` says why (compute/opencl/probe.py: judge_speed)."""

from __future__ import annotations

from compute.opencl.probe import SLOWER_MAX, DeviceStatus, is_simulator, ranked, runtime_of


def status(index, runtime, run_s, ok=True, platform="P", device="D"):
    return DeviceStatus(index, platform, device, runtime, ok, "" if ok else "broken", 1.0, run_s)


def test_oclgrind_is_recognised_as_a_simulator_though_it_calls_itself_a_gpu():
    assert is_simulator("Oclgrind", "Oclgrind Simulator")
    assert runtime_of("Oclgrind", True, "Oclgrind Simulator") == "simulator"
    assert runtime_of("NVIDIA CUDA", True, "NVIDIA H100") == "gpu"
    assert runtime_of("Portable Computing Language", False, "pthread-Intel(R) Xeon(R)") == "pocl"


def test_a_working_simulator_is_unusable_and_says_why():
    out = ranked([status(0, "simulator", 0.005, platform="Oclgrind", device="Oclgrind Simulator"),
                  status(1, "pocl", 0.0003)])
    assert [s.index for s in out if s.ok] == [1]
    sim = next(s for s in out if s.index == 0)
    assert "simulator" in sim.reason and "unusable: a simulator" in sim.line()


def test_a_simulator_alone_is_not_chosen_either():
    out = ranked([status(0, "simulator", 0.005)])
    assert not any(s.ok for s in out)


def test_a_device_far_slower_than_the_fastest_is_not_chosen_even_when_preferred():
    out = ranked([status(0, "gpu", 0.0001 * (SLOWER_MAX + 1)), status(1, "intel-cpu", 0.0001)])
    assert out[0].index == 1 and out[0].ok
    gpu = next(s for s in out if s.index == 0)
    assert not gpu.ok and "far slower than device 1" in gpu.reason


def test_a_gpu_a_few_times_slower_on_the_probe_keeps_its_preference():
    out = ranked([status(0, "intel-cpu", 0.0001), status(1, "gpu", 0.0005)])
    assert [s.index for s in out if s.ok] == [1, 0]  # launch cost on tiny shapes is not a reason
