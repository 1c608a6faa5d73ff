"""Reading checkpoints, key maps and strict loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from polyglean.models import (
    STRIP_MODULE,
    CheckpointError,
    KeyMap,
    load_checkpoint,
    load_state_dict_file,
    load_state_dict_strict,
)


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


class TestKeyMap:
    def test_strip_module(self) -> None:
        sd = {"module.a.weight": torch.zeros(1), "b.bias": torch.ones(1)}
        assert list(STRIP_MODULE.apply(sd)) == ["a.weight", "b.bias"]

    def test_first_rule_wins_no_chaining(self) -> None:
        km = KeyMap(rules=((r"bn1\.(\w+)", r"bn2.\1"), (r"bn2\.(\w+)", r"bn3.\1")))
        out = km.apply({"bn1.weight": torch.zeros(1), "bn2.weight": torch.ones(1)})
        assert out["bn2.weight"].item() == 0 and out["bn3.weight"].item() == 1

    def test_rules_match_whole_key(self) -> None:
        km = KeyMap(rules=((r"fc\.(\w+)", r"head.\1"),))
        assert km.rename("fc.weight") == "head.weight"
        assert km.rename("x.fc.weight") is None

    def test_unmatched_without_passthrough_raises(self) -> None:
        km = KeyMap(rules=((r"a\.(\w+)", r"b.\1"),), passthrough=False)
        with pytest.raises(CheckpointError, match="match no rule.*'c.weight'"):
            km.apply({"a.weight": torch.zeros(1), "c.weight": torch.zeros(1)})

    def test_collision_raises(self) -> None:
        with pytest.raises(CheckpointError, match="two checkpoint keys"):
            STRIP_MODULE.apply({"module.w": torch.zeros(1), "w": torch.zeros(1)})

    def test_bad_pattern_raises(self) -> None:
        with pytest.raises(ValueError, match="regular expression"):
            KeyMap(rules=((r"(", r"x"),))


class TestLoadStateDictFile:
    @pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
    def test_accepted_layouts(self, tmp_path: Path, wrap: str | None) -> None:
        sd = _net().state_dict()
        torch.save(sd if wrap is None else {wrap: sd, "epoch": 3}, tmp_path / "c.pt")
        got = load_state_dict_file(tmp_path / "c.pt")
        assert list(got) == list(sd)

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match="nope.pt"):
            load_state_dict_file(tmp_path / "nope.pt")

    def test_garbage_bytes(self, tmp_path: Path) -> None:
        path = tmp_path / "garbage.pth"
        path.write_bytes(bytes(range(256)) * 8)
        with pytest.raises(CheckpointError, match="garbage.pth.*not a readable PyTorch checkpoint"):
            load_state_dict_file(path)

    def test_empty_file(self, tmp_path: Path) -> None:
        path = tmp_path / "empty.pth"
        path.write_bytes(b"")
        with pytest.raises(CheckpointError, match="empty.pth"):
            load_state_dict_file(path)

    def test_not_a_dict(self, tmp_path: Path) -> None:
        torch.save(torch.zeros(3), tmp_path / "tensor.pt")
        with pytest.raises(CheckpointError, match="tensor.pt holds a Tensor, not a state dict"):
            load_state_dict_file(tmp_path / "tensor.pt")

    def test_dict_of_non_tensors(self, tmp_path: Path) -> None:
        torch.save({"lr": 0.1, "epoch": 3}, tmp_path / "meta.pt")
        with pytest.raises(CheckpointError, match="meta.pt is not a state dict.*'lr'"):
            load_state_dict_file(tmp_path / "meta.pt")

    def test_pickled_object_refused(self, tmp_path: Path) -> None:
        torch.save({"net": _net()}, tmp_path / "module.pt")
        with pytest.raises(CheckpointError, match="module.pt.*never unpickled") as caught:
            load_state_dict_file(tmp_path / "module.pt")
        assert "weights_only" not in str(caught.value)  # never PyTorch's advice to turn the safety off

    def test_hostile_pickle_refused_without_running_it(self, tmp_path: Path) -> None:
        ran = tmp_path / "ran"

        class Hostile:
            def __reduce__(self):  # unpickling would create the file `ran`
                return (Path.touch, (ran,))

        torch.save({"state_dict": {"w": torch.ones(1)}, "x": Hostile()}, tmp_path / "hostile.pt")
        with pytest.raises(CheckpointError) as caught:
            load_state_dict_file(tmp_path / "hostile.pt")
        assert "weights_only" not in str(caught.value) and "\n" not in str(caught.value)
        assert not ran.exists()

    def test_text_file_is_one_clear_error(self, tmp_path: Path) -> None:
        (tmp_path / "notes.txt").write_text("these are not weights\n" * 20)
        with pytest.raises(CheckpointError, match="notes.txt' is not a readable PyTorch checkpoint: not a file "
                                                  "written by torch.save"):
            load_state_dict_file(tmp_path / "notes.txt")


class TestStrictLoading:
    def test_loads_exactly(self, tmp_path: Path) -> None:
        src = _net()
        torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "c.th")
        dst = load_checkpoint(_net(), tmp_path / "c.th")
        for a, b in zip(src.state_dict().values(), dst.state_dict().values()):
            assert a.equal(b)

    def test_wrong_keys_named(self, tmp_path: Path) -> None:
        sd = _net().state_dict()
        sd["extra.weight"] = sd.pop("0.weight")
        torch.save(sd, tmp_path / "wrong.pt")
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(_net(), tmp_path / "wrong.pt")
        msg = str(info.value)
        assert "wrong.pt" in msg
        assert "1 missing key(s): '0.weight'" in msg and "1 unexpected key(s): 'extra.weight'" in msg

    def test_shape_mismatch_named(self) -> None:
        sd = _net().state_dict()
        sd["3.weight"] = torch.zeros(5, 4)
        with pytest.raises(CheckpointError, match=r"3.weight: checkpoint \(5, 4\) vs model \(2, 4\)"):
            load_state_dict_strict(_net(), sd)

    def test_many_missing_are_truncated(self) -> None:
        with pytest.raises(CheckpointError, match=r"missing key\(s\).*more\)"):
            load_state_dict_strict(_net(), {"0.weight": torch.zeros(4, 3, 3, 3)})

    def test_old_batchnorm_counter_tolerated(self) -> None:
        src = _net()
        sd = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
        dst = _net()
        dst[1].num_batches_tracked.fill_(7)
        load_state_dict_strict(dst, sd)
        assert dst[1].num_batches_tracked.item() == 0
