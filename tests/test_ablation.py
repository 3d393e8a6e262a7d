"""The ablation driver: resumable runs, mean and spread per row, the chart."""
import csv
import shutil

import pytest

from confeti_fast import ablation


def test_rows_resume_summarize_and_plot(tmp_path, monkeypatch):
    calls = []

    def fake_run(row, seed, work_root, repo):
        calls.append((row, seed))
        final = {"source_only": 10.0, "full": 20.0}[row] + seed
        return {"row": row, "preset": ablation.ROWS[row][0], "seed": seed, "final_miou": f"{final:.2f}",
                "best_miou": f"{final + 1:.2f}", "wall_s": "1"}

    monkeypatch.setattr(ablation, "run_row", fake_run)
    args = ["--seeds", "0", "1", "2", "--rows", "source_only", "full", "--out", str(tmp_path / "out"),
            "--work-dir", str(tmp_path / "work")]
    ablation.main(args[:6] + args[7:])  # source only first
    ablation.main(args)  # then the table: the three source-only runs are not repeated
    assert calls == [("source_only", s) for s in (0, 1, 2)] + [("full", s) for s in (0, 1, 2)]
    with open(tmp_path / "out" / "summary.csv") as f:
        summary = {r["row"]: r for r in csv.DictReader(f)}
    assert float(summary["source_only"]["final_miou_mean"]) == pytest.approx(11.0)
    assert float(summary["full"]["final_miou_std"]) == pytest.approx(1.0)  # sample std of 20, 21, 22
    assert float(summary["full"]["best_miou_mean"]) == pytest.approx(22.0)
    assert (tmp_path / "out" / "ablation.png").stat().st_size > 5000


def test_stage2_mious_reads_final_and_best(tmp_path):
    log = tmp_path / "stage2" / "log.jsonl"
    log.parent.mkdir()
    log.write_text('{"iter": 10, "loss/src_ce": 1.0}\n{"iter": 10, "mIoU": 12.5}\n{"iter": 20, "mIoU": 11.0}\n')
    assert ablation._stage2_mious(tmp_path) == (11.0, 12.5)


def _tiny_runs(tmp_path):
    """The ablation's layout with 4-iteration runs: source_only and oracle /seed0/stage2, full/seed0/stage0 and 1."""
    from confeti_fast.trainer import Trainer
    from helpers import tiny_config

    work = tmp_path / "work"
    Trainer(tiny_config(tmp_path / "data_s", base="source_only"), 2, work / "source_only" / "seed0",
            progress=False).train()
    # the oracle judge: any segmentor run will do for the wiring (the real one trains on target labels)
    shutil.copytree(work / "source_only", work / "oracle")
    cfg = tiny_config(tmp_path / "data_f", cut=True)
    for stage in (0, 1):
        Trainer(cfg, stage, work / "full" / "seed0", progress=False).train()
    return work


def test_stylization_check_judges_g_with_two_segmentors(tmp_path, monkeypatch):
    work = _tiny_runs(tmp_path)
    picture = tmp_path / "stylization.png"
    row = ablation.stylization_check(work, 0, count=2, picture=picture)
    assert set(row) == set(ablation.STYLE_FIELDS) and row["images"] == 2
    assert all(0 <= float(row[f"{judge}_{view}_miou"]) <= 100 for judge in ablation.JUDGES for view in ablation.VIEWS)
    for view in ("plain", "colour", "stage0_g", "stage1_g"):
        assert 0 < float(row[f"{view}_ideal_ssim"]) < 0.999 and -1 <= float(row[f"{view}_ideal_edge"]) < 0.999
        assert 0 < float(row[f"{view}_ideal_psnr"]) < 60
    assert float(row["oracle_stage1_g_share"]) == pytest.approx(
        float(row["oracle_stage1_g_miou"]) / float(row["oracle_ideal_miou"]), abs=1e-3)
    from PIL import Image
    width, height = Image.open(picture).size  # x_s, G(x_s), ideal over the oracle's readings: 3 x 2 tiles
    assert width == 3 * 640 and height == 2 * (360 + 14)

    # with G replaced by the identity, the G views are the plain image: the same readings and scores
    monkeypatch.setattr(ablation, "_stylize", lambda style, image: image)
    same = ablation.stylization_check(work, 0, count=2)
    for judge in ablation.JUDGES:
        assert same[f"{judge}_stage0_g_miou"] == same[f"{judge}_stage1_g_miou"] == row[f"{judge}_plain_miou"]
        assert same[f"{judge}_ideal_miou"] == row[f"{judge}_ideal_miou"]
    for score in ablation.PAIRED:
        assert same[f"stage0_g_ideal_{score}"] == same[f"stage1_g_ideal_{score}"] == row[f"plain_ideal_{score}"]


def test_stylization_summary_means_and_stds():
    rows = [dict.fromkeys(ablation.STYLE_FIELDS, str(v)) for v in (1.0, 2.0, 3.0)]
    summary = {s["column"]: s for s in ablation.summarize_stylization(rows)}
    assert set(summary) == set(ablation.STYLE_FIELDS[2:])
    assert summary["oracle_ideal_miou"]["mean"] == 2.0 and summary["oracle_ideal_miou"]["std"] == 1.0
    assert summary["oracle_ideal_miou"]["n"] == 3


def test_stylization_table_waits_for_the_runs_and_keeps_written_seeds(tmp_path, monkeypatch):
    calls = []

    def fake_check(work, seed, picture=None):
        calls.append(seed)
        return dict.fromkeys(ablation.STYLE_FIELDS, seed)

    monkeypatch.setattr(ablation, "stylization_check", fake_check)
    work, out = tmp_path / "work", tmp_path / "out"
    out.mkdir()
    for seed in (0, 1):
        for path in (work / "source_only" / f"seed{seed}" / "stage2", work / "oracle" / f"seed{seed}" / "stage2",
                     work / "full" / f"seed{seed}" / "stage1"):
            path.mkdir(parents=True)
            if seed == 0 or "full" not in str(path):
                (path / "last.pth").touch()
    ablation._stylization_table(work, [0, 1], out)  # seed 1 has no full run yet
    assert calls == [0]
    (work / "full" / "seed1" / "stage1" / "last.pth").touch()
    ablation._stylization_table(work, [0, 1], out)  # seed 0 is not checked again
    assert calls == [0, 1]
    with open(out / "stylization.csv") as f:
        assert [r["seed"] for r in csv.DictReader(f)] == ["0", "1"]


def test_every_row_is_a_preset_and_the_oracle_trains_on_the_target_train_split():
    from confeti_fast.config import load_config

    cfgs = {row: load_config(preset) for row, (preset, _) in ablation.ROWS.items()}
    oracle, demo = cfgs["oracle"], cfgs["full"]
    assert oracle["method"] == "source_only" and oracle["target"] == demo["target"]
    assert (oracle["source"]["type"], oracle["source"]["root"]) == ("cityscapes", demo["target"]["root"])
    assert oracle["stages"]["2"] == demo["stages"]["2"]  # the same stage-2 budget as every row
