"""Progress a job running several training runs can show: update k of n of every lane (issue 29)."""

from __future__ import annotations

import json

from fluxguide.harness.progress import PROGRESS_FILE, LaneDisplay, describe, read_progress, write_progress
from tests.scripts import SMALL_RUNS, load_script, run_script


def test_a_training_run_writes_its_progress_after_every_update(tmp_path) -> None:
    script = load_script("train_reward_gradient")
    run_script(script, [*SMALL_RUNS["train_reward_gradient"], "--run-dir", str(tmp_path), "--total-updates", "3",
                        "--eval-every", "2"])
    progress = json.loads((tmp_path / PROGRESS_FILE).read_text())
    assert progress["stage"] == "reward-gradient" and (progress["done"], progress["total"]) == (3, 3)
    assert 0.0 <= progress["heldout_pass_rate"] <= 1.0  # the last held-out evaluation before the update
    assert describe(progress).startswith("reward-gradient: 3/3 updates, held-out pass ")


def test_the_lanes_show_the_newest_progress_of_each_job_in_flight(tmp_path) -> None:
    data, train = tmp_path / "bc" / "data", tmp_path / "bc" / "train"
    write_progress(data / "run_seed0", stage="collect", done=2, total=8, unit="batches")  # one level down
    lanes = LaneDisplay(2, disable=True)
    lanes.start("bc seed 0", [data, train])
    lanes.start("ppo seed 0", [tmp_path / "ppo"])
    assert lanes.lines() == ["bc seed 0 | collect: 2/8 batches", "ppo seed 0 | starting"]
    write_progress(train, stage="bc", done=5, total=40, heldout_pass_rate=0.4375)  # the newer stage wins
    assert read_progress([data, train])["stage"] == "bc"
    assert lanes.lines()[0] == "bc seed 0 | bc: 5/40 updates, held-out pass 0.438"
    assert lanes.run("ppo seed 0", [tmp_path / "ppo"], lambda: 7) == 7
    assert [line.split(" |")[0] for line in lanes.lines()] == ["bc seed 0"]  # a finished job leaves its lane
    with LaneDisplay(1, interval=0.01, disable=True):  # the polling thread starts and stops cleanly
        pass
