"""The ablation driver: resumable runs, mean and spread per row, the chart."""
import csv

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
