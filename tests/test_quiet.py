"""What components.quiet drops is exactly the library notice it names; everything else still shows."""

from __future__ import annotations

import pytest

from components.quiet import quiet_op_builds


def test_deepspeed_op_build_notices_go_and_other_prints_stay(capsys: pytest.CaptureFixture[str]) -> None:
    with quiet_op_builds():
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("[WARNING] cpu_adam: something a user must see")
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully, then more")
    out = capsys.readouterr().out.splitlines()
    assert out == ["[WARNING] cpu_adam: something a user must see",
                   "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully, then more"]


def test_what_was_printed_before_an_error_still_shows(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RuntimeError, match="init failed"), quiet_op_builds():
        print("gloo: connecting to rank 1")
        raise RuntimeError("init failed")
    assert capsys.readouterr().out == "gloo: connecting to rank 1\n"
