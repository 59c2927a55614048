"""The ablation report from hand-written results.json files: numbers, absent groups, rows, files."""
import csv
import json
import os
from pathlib import Path

import cv2
import pytest

from analysis.report import build_report, is_up_to_date, report_dir
from engine.phase_ii_outputs import sha256_file
from tests.helpers import run_main_in_process
from utils.errors import UserError

CONFIG = "fake"
COUNTS = [120, 50, 10, 5]  # one many-shot, one medium, two few-shot classes
NOTES = ["seed0", "seed1", "seed2"]


def write_results(root: Path, phase: str, note: str, *, top1, many=None, medium=None, few=None, head=None, tail=None,
                  per_class=(50.0, 50.0, 50.0, 50.0), finished=True) -> Path:
    folder = root / "checkpoints" / phase / CONFIG / note
    folder.mkdir(parents=True, exist_ok=True)
    data = {"finished": finished, "phase": phase, "config": CONFIG, "note": note, "top1": top1, "many": many,
            "medium": medium, "few": few, "head": head, "tail": tail,
            "per_class": list(per_class), "train_counts": COUNTS, "groups": {"hr": 0.9}}
    (folder / "results.json").write_text(json.dumps(data))
    return folder / "results.json"


@pytest.fixture()
def fake_runs(tmp_path) -> Path:
    # Phase I: 3 notes. top1 60/62/64 -> 62.00 ± 2.00; tail 10/20/30 -> 20.00 ± 10.00; many absent everywhere
    for note, top1, tail, few in zip(NOTES, (60.0, 62.0, 64.0), (10.0, 20.0, 30.0), (5.0, 5.0, 5.0)):
        write_results(tmp_path, "phase_i", note, top1=top1, medium=40.0, few=few, head=90.0, tail=tail,
                      per_class=(90.0, 40.0, 10.0, 0.0))
    # cRT control: top1 70/71/75 -> mean 72, deviations -2,-1,3 -> var 14/2 = 7 -> std 2.6458 -> 2.65
    for note, top1 in zip(NOTES, (70.0, 71.0, 75.0)):
        write_results(tmp_path, "phase_iii_offline-none", note, top1=top1, medium=50.0, few=30.0, head=80.0, tail=40.0,
                      per_class=(80.0, 50.0, 40.0, 20.0))
    # FSA offline: finished for seed0 and seed1 only (seed2 interrupted) -> n = 2; 66/68 -> 67.00 ± 1.41
    write_results(tmp_path, "phase_iii_offline", "seed0", top1=66.0, medium=55.0, few=35.0, head=81.0, tail=45.0)
    write_results(tmp_path, "phase_iii_offline", "seed1", top1=68.0, medium=57.0, few=37.0, head=83.0, tail=47.0)
    write_results(tmp_path, "phase_iii_offline", "seed2", top1=1.0, finished=False)
    # FSA online: only an unfinished run -> the row is omitted
    write_results(tmp_path, "phase_iii_online", "seed0", top1=1.0, finished=False)
    # a run of another note only -> ignored
    write_results(tmp_path, "phase_iii_offline-tailcalib", "other", top1=1.0)
    # an extra phase III folder: its own row, labelled by the folder name; one note, so no ±
    write_results(tmp_path, "phase_iii_online-mine", "seed1", top1=50.0, medium=45.0, few=25.0, head=70.0, tail=30.0)
    return tmp_path


def table_rows(markdown: str, groups: bool = False) -> dict[str, list[str]]:
    """The rows of the main table (the first one; cost and paired differences follow in tables of their
    own); the group header rows (``*FSA*``) only with `groups`."""
    rows = {}
    main_table = markdown.split("\n\n## ")[0]
    for line in main_table.splitlines():
        if line.startswith("| ") and not line.startswith("| method"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if groups or not cells[0].startswith("*"):
                rows[cells[0]] = cells[1:]
    return rows


def test_markdown_numbers_are_mean_and_sample_std_over_notes(fake_runs, capsys):
    build_report(CONFIG, NOTES, fake_runs)
    printed = capsys.readouterr().out
    markdown = (report_dir(CONFIG, NOTES, fake_runs) / "ablation.md").read_text()
    assert markdown.strip() in printed  # the table is also printed
    rows = table_rows(markdown)
    # columns: top1 many medium few head tail n
    assert rows["Phase I baseline (CE)"] == ["62.00 ± 2.00", "—", "40.00 ± 0.00", "5.00 ± 0.00", "90.00 ± 0.00",
                                             "20.00 ± 10.00", "3"]
    assert rows["cRT control (offline, no fusion)"][0] == "72.00 ± 2.65"
    assert rows["cRT control (offline, no fusion)"][-1] == "3"
    assert rows["FSA offline"] == ["67.00 ± 1.41", "—", "56.00 ± 1.41", "36.00 ± 1.41", "82.00 ± 1.41",
                                   "46.00 ± 1.41", "2"]
    assert rows["phase_iii_online-mine"] == ["50.00", "—", "45.00", "25.00", "70.00", "30.00", "1"]
    # missing rows are omitted, not shown as zeros; order: fixed rows first, extra folders after
    assert list(rows) == ["Phase I baseline (CE)", "cRT control (offline, no fusion)", "FSA offline",
                          "phase_iii_online-mine"]
    assert "FSA online" not in markdown and "TailCalib (offline)" not in markdown
    assert "0.00 ± 0.00" not in rows["Phase I baseline (CE)"][1]
    # rows grouped as in the method table, a header row per group; a folder the table lacks under "other"
    assert list(table_rows(markdown, groups=True)) == [
        "*baseline*", "Phase I baseline (CE)", "*FSA*", "cRT control (offline, no fusion)", "FSA offline", "*other*",
        "phase_iii_online-mine"]
    assert table_rows(markdown, groups=True)["*FSA*"] == [""] * 7
    # what the numbers are, and the notes
    assert "selected model" in markdown and "final evaluation (no validation split" in markdown
    assert "`seed0`, `seed1`, `seed2`" in markdown
    assert "FSA offline: seed2" in markdown  # which note is missing where


def test_csv_holds_mean_and_std_columns_and_empty_cells_for_absent(fake_runs):
    build_report(CONFIG, NOTES, fake_runs, echo=False)
    with open(report_dir(CONFIG, NOTES, fake_runs) / "ablation.csv", newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["Phase I baseline (CE)", "cRT control (offline, no fusion)", "FSA offline",
                          "phase_iii_online-mine"]
    crt = rows["cRT control (offline, no fusion)"]
    assert float(crt["top1_mean"]) == pytest.approx(72.0)
    assert float(crt["top1_std"]) == pytest.approx(7 ** 0.5, abs=1e-4)
    assert crt["n"] == "3" and crt["phase"] == "phase_iii_offline-none"
    p1 = rows["Phase I baseline (CE)"]
    assert float(p1["tail_std"]) == pytest.approx(10.0) and float(p1["tail_mean"]) == pytest.approx(20.0)
    assert p1["many_mean"] == "" and p1["many_std"] == ""  # absent: empty, never 0
    mine = rows["phase_iii_online-mine"]
    assert float(mine["top1_mean"]) == 50.0 and mine["top1_std"] == "" and mine["notes"] == "seed1"
    assert rows["FSA offline"]["notes"] == "seed0 seed1"


def test_json_and_pngs(fake_runs):
    data = build_report(CONFIG, NOTES, fake_runs, echo=False)
    out = report_dir(CONFIG, NOTES, fake_runs)
    saved = json.loads((out / "report.json").read_text())
    assert saved["notes"] == NOTES and saved["evaluation"] == "selected"
    p1 = saved["rows"][0]
    assert p1["label"] == "Phase I baseline (CE)" and p1["n"] == 3
    # each row carries its method-table id and group; a folder the table does not know has none
    assert [(r["id"], r["group"]) for r in saved["rows"]] == [
        ("ce", "baseline"), ("control_offline", "FSA"), ("fsa_offline", "FSA"), (None, None)]
    assert saved["rows"][3]["phase"] == "phase_iii_online-mine"
    assert p1["metrics"]["top1"]["mean"] == pytest.approx(62.0) and p1["metrics"]["top1"]["std"] == pytest.approx(2.0)
    assert p1["metrics"]["many"] == {"mean": None, "std": None, "n": 0, "values": []}
    assert p1["per_class"] == {"train_counts": COUNTS, "accuracy": [90.0, 40.0, 10.0, 0.0]}
    assert saved["rows"][2]["missing_notes"] == ["seed2"]
    assert data["rows"] == saved["rows"]
    # per_class.png: one 300 x 220 pixel panel per row (4 rows: one line of 4), 90 pixels for title and legend
    for name, shape in (("ablation.png", (500, 900, 3)), ("per_class.png", (310, 1200, 3))):
        image = cv2.imread(str(out / name))
        assert image is not None and image.shape == shape, name
        assert image.std() > 0, f"{name} is blank"


def test_single_note_has_no_std_and_no_n(fake_runs):
    write_results(fake_runs, "phase_i", "default", top1=55.5, medium=41.0, few=None, head=88.0, tail=12.25)
    build_report(CONFIG, ["default"], fake_runs, echo=False)
    markdown = (report_dir(CONFIG, ["default"], fake_runs) / "ablation.md").read_text()
    assert "| method | top1 | many | medium | few | head | tail |" in markdown
    assert table_rows(markdown) == {"Phase I baseline (CE)": ["55.50", "—", "41.00", "—", "88.00", "12.25"]}
    assert "±" not in markdown.split("\n\n")[1]


def test_up_to_date_until_a_run_changes(fake_runs):
    build_report(CONFIG, NOTES, fake_runs, echo=False)
    assert is_up_to_date(CONFIG, NOTES, fake_runs)
    assert not is_up_to_date(CONFIG, ["seed0"], fake_runs)  # other notes
    path = write_results(fake_runs, "phase_iii_online", "seed0", top1=61.0)  # a new finished run
    assert not is_up_to_date(CONFIG, NOTES, fake_runs)
    build_report(CONFIG, NOTES, fake_runs, echo=False)
    assert is_up_to_date(CONFIG, NOTES, fake_runs)
    later = (report_dir(CONFIG, NOTES, fake_runs) / "report.json").stat().st_mtime + 10
    os.utime(path, (later, later))  # a rerun of an existing row
    assert not is_up_to_date(CONFIG, NOTES, fake_runs)


def test_no_finished_run_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="No finished run of config 'nothing'"):
        build_report("nothing", ["default"], tmp_path)


def test_cli(fake_runs, capsys):
    code, err = run_main_in_process("report.py", "--config", CONFIG, "--notes", *NOTES, cwd=fake_runs)
    assert code == 0, err
    assert "| FSA offline | 67.00 ± 1.41 |" in capsys.readouterr().out
    code, err = run_main_in_process("report.py", "--config", "nothing", cwd=fake_runs)
    assert code == 2 and err.startswith("error: No finished run") and "Traceback" not in err


def test_unreadable_results_are_named_never_dropped(fake_runs):
    (fake_runs / "checkpoints/phase_i" / CONFIG / "seed1/results.json").write_text('{"finished": true, "top1"')
    (fake_runs / "checkpoints/phase_iii_offline-none" / CONFIG / "seed2/results.json").write_text("[1, 2]")
    code, err = run_main_in_process("report.py", "--config", CONFIG, "--notes", *NOTES, cwd=fake_runs)
    assert code == 2 and err.startswith("error: cannot read the results.json of 2 run(s)") and "Traceback" not in err
    assert f"checkpoints/phase_i/{CONFIG}/seed1/results.json (not readable as JSON" in err
    assert f"python phase_i_train_or_test.py --config {CONFIG} --note seed1 --overwrite" in err
    assert f"checkpoints/phase_iii_offline-none/{CONFIG}/seed2/results.json (a JSON list, not an object" in err
    assert (f"python phase_iii_offline_train_or_test.py --config {CONFIG} --note seed2 --opts finetune.generator=none "
            f"--overwrite") in err
    assert "delete its run folder" in err
    assert not (fake_runs / "reports").exists()
    # a note that was not asked for does not matter
    build_report(CONFIG, ["seed0"], fake_runs, echo=False)


def test_paired_differences_and_t_intervals_against_a_hand_computation(tmp_path):
    # phase I 60/62/64, FSA online 61/64/68 -> differences 1, 2, 4: mean 7/3, sd sqrt(7/3), se sd/sqrt(3),
    # half-width t(0.975, 2) = 4.302653 x se = 3.794603 -> [-1.461270, 6.127936]: includes 0
    # online control 58/60/63 -> FSA - control = 3, 4, 5: mean 4, sd 1, half 4.302653 / sqrt(3) = 2.484138
    for note, p1, fsa, control in zip(NOTES, (60.0, 62.0, 64.0), (61.0, 64.0, 68.0), (58.0, 60.0, 63.0)):
        write_results(tmp_path, "phase_i", note, top1=p1, tail=10.0)
        write_results(tmp_path, "phase_iii_online", note, top1=fsa, tail=10.0)
        write_results(tmp_path, "phase_iii_online-none", note, top1=control, tail=None)
    write_results(tmp_path, "phase_iii_online", "seed3", top1=99.0)  # no phase I run or control to pair with
    data = build_report(CONFIG, [*NOTES, "seed3"], tmp_path, echo=False)
    paired = {(d["method"], d["reference"], d["metric"]): d for d in data["paired"]}
    vs_phase_i = paired[("FSA online", "Phase I baseline (CE)", "top1")]
    assert vs_phase_i["per_note"] == {"seed0": 1.0, "seed1": 2.0, "seed2": 4.0}
    assert vs_phase_i["mean"] == pytest.approx(7 / 3)
    assert vs_phase_i["ci95"] == pytest.approx([-1.461270, 6.127936], abs=2e-4)
    assert vs_phase_i["excludes_zero"] is False and "includes 0" in vs_phase_i["verdict"]
    vs_control = paired[("FSA online", "cRT control (online, no fusion)", "top1")]
    assert vs_control["ci95"] == pytest.approx([4 - 2.484138, 4 + 2.484138], abs=2e-4)
    assert vs_control["excludes_zero"] is True and vs_control["verdict"].startswith("higher")
    assert paired[("FSA online", "Phase I baseline (CE)", "tail")]["per_note"] == {n: 0.0 for n in NOTES}
    assert ("FSA online", "cRT control (online, no fusion)", "tail") not in paired  # the control has no tail value
    markdown = (report_dir(CONFIG, [*NOTES, "seed3"], tmp_path) / "ablation.md").read_text()
    assert "## Paired differences" in markdown and "[+1.52, +6.48]" in markdown


def test_t_critical_values():
    from analysis.stats import t_critical_95

    assert t_critical_95(1) == pytest.approx(12.7062, abs=1e-4)
    assert t_critical_95(30) == pytest.approx(2.0423, abs=1e-4)
    for df, exact in ((31, 2.039513), (60, 2.000298), (200, 1.971896)):
        assert t_critical_95(df) == pytest.approx(exact, abs=2e-4)


def test_a_single_note_has_no_interval(tmp_path):
    write_results(tmp_path, "phase_i", "default", top1=60.0)
    write_results(tmp_path, "phase_iii_offline", "default", top1=63.0)
    (d,) = [d for d in build_report(CONFIG, ["default"], tmp_path, echo=False)["paired"] if d["metric"] == "top1"]
    assert d["per_note"] == {"default": 3.0} and d["ci95"] is None and "no interval" in d["verdict"]


def test_cost_table_gives_rows_trained_on_and_wall_time(fake_runs):
    for note, seen, wall in zip(NOTES, (1000, 1000, 1300), (10.0, 12.0, 14.0)):
        path = fake_runs / "checkpoints/phase_i" / CONFIG / note / "results.json"
        data = json.loads(path.read_text())
        path.write_text(json.dumps({**data, "samples_seen": seen, "wall_time_s": wall}))
    build_report(CONFIG, NOTES, fake_runs, echo=False)
    markdown = (report_dir(CONFIG, NOTES, fake_runs) / "ablation.md").read_text()
    cost = markdown.split("## Training cost")[1].split("\n\n## ")[0]
    assert "| Phase I baseline (CE) | 1,100 | 12.0 | 1,100 | 12.0 |" in cost
    assert "| FSA offline | — | — | — | — |" in cost  # not recorded: absent, never 0


def test_cost_with_backbone_and_teachers_adds_the_runs_a_model_was_built_from(tmp_path):
    """CBD's total = its own + its 3 teachers; TailCalibX on CBD = its own + CBD + the teachers; a missing
    teacher makes the total unknown (—), never a smaller number."""
    def with_cost(path: Path, seen: int, wall: float, **extra) -> Path:
        path.write_text(json.dumps({**json.loads(path.read_text()), "samples_seen": seen, "wall_time_s": wall, **extra}))
        return path

    note = "seed0"
    teachers = [with_cost(write_results(tmp_path, "phase_i-cosine_ce", f"{note}-teacher{k}", top1=60.0), 1000, 10.0 * k)
                for k in (1, 2, 3)]
    # teacher paths as the phase I run records them: relative to the working directory (the root)
    cbd = with_cost(write_results(tmp_path, "phase_i-cbd", note, top1=70.0), 1000, 50.0,
                    teachers=[str((t.parent / "best_model.pt").relative_to(tmp_path)) for t in teachers])
    with_cost(write_results(tmp_path, "phase_iii_online-tailcalibx-on-cbd", note, top1=72.0), 300, 5.0,
              phase_i_checkpoint=str(cbd.parent / "best_model.pt"))
    data = build_report(CONFIG, [note], tmp_path, echo=False)
    cost = (report_dir(CONFIG, [note], tmp_path) / "ablation.md").read_text().split("## Training cost")[1].split("\n\n## ")[0]
    assert "| CBD (class-balanced distillation) | 1,000 | 50.0 | 4,000 | 110.0 |" in cost  # 50 + 10 + 20 + 30
    assert "| TailCalibX (online) on CBD (class-balanced distillation) | 300 | 5.0 | 4,300 | 115.0 |" in cost
    assert "| CosineCE | 1,000 | 10.0 | 1,000 | 10.0 |" not in cost  # teachers are not the CosineCE row (note differs)
    by_id = {row["id"]: row for row in data["rows"]}
    assert by_id["cbd_tailcalibx"]["cost"]["total_wall_time_s"]["values"] == [115.0]
    teachers[1].unlink()
    build_report(CONFIG, [note], tmp_path, echo=False)
    cost = (report_dir(CONFIG, [note], tmp_path) / "ablation.md").read_text().split("## Training cost")[1].split("\n\n## ")[0]
    assert "| CBD (class-balanced distillation) | 1,000 | 50.0 | — | — |" in cost


def test_pairs_asked_for_by_row_id_are_added_and_unknown_ids_refused(fake_runs, capsys):
    # cRT control 70/71/75 minus phase I 60/62/64 = 10, 9, 11: mean 10, sd 1, half-width 4.302653 / sqrt(3)
    data = build_report(CONFIG, NOTES, fake_runs, echo=False, pairs=[("control_offline", "ce")])
    paired = {(d["method"], d["reference"], d["metric"]): d for d in data["paired"]}
    extra = paired[("cRT control (offline, no fusion)", "Phase I baseline (CE)", "top1")]
    assert extra["per_note"] == {"seed0": 10.0, "seed1": 9.0, "seed2": 11.0}
    assert extra["ci95"] == pytest.approx([10 - 2.484138, 10 + 2.484138], abs=2e-4)
    assert ("FSA offline", "cRT control (offline, no fusion)", "top1") in paired  # the table's pairs stay
    assert "| cRT control (offline, no fusion) | Phase I baseline (CE) | top1 |" in \
        (report_dir(CONFIG, NOTES, fake_runs) / "ablation.md").read_text()
    code, err = run_main_in_process("report.py", "--config", CONFIG, "--notes", *NOTES, "--pairs", "fsa_offline:lws",
                                    cwd=fake_runs)
    assert code == 2 and err.startswith("error: --pairs names row id(s) lws") and "Traceback" not in err
    assert "fsa_offline" in err.split("the rows' ids:")[1]
    code, err = run_main_in_process("report.py", "--config", CONFIG, "--pairs", "fsa_offline", cwd=fake_runs)
    assert code == 2 and "--pairs takes METHOD:REFERENCE" in err


def test_row_styles_tell_apart_the_rows_of_a_full_suite_report():
    from analysis.plots import row_styles

    styles = row_styles(40)  # --suite full + tailcalibx + arms on other backbones: about 25 rows
    assert len(set(styles)) == 40


# ------------------------------------------------------------------------------------------------
# Runs that do not belong together are refused; one folder per note set
# ------------------------------------------------------------------------------------------------
def write_config(root: Path, phase: str, note: str, **sections) -> None:
    """A run's saved config.yaml: seed, dataset and model sections (phase I's), overridden by ``sections``."""
    import yaml

    saved = {"seed": 0, "dataset": {"name": "synthetic-LT", "imbalance": 100.0, "root": None},
             "model": {"arch": "resnet8", "classifier": "linear"}, **sections}
    (root / "checkpoints" / phase / CONFIG / note / "config.yaml").write_text(yaml.safe_dump(saved))


def write_chain(root: Path, note: str) -> Path:
    """Phase I (results, config.yaml, a best_model.pt), phase II with the provenance phase II writes, and FSA
    offline and its control recording that phase I checkpoint, as phase III does; returns the checkpoint."""
    from engine.phase_ii_outputs import make_provenance, write_provenance

    write_results(root, "phase_i", note, top1=60.0)
    write_config(root, "phase_i", note)
    checkpoint = root / "checkpoints/phase_i" / CONFIG / note / "best_model.pt"
    checkpoint.write_bytes(b"phase I weights " + note.encode())
    features = root / "features" / CONFIG / note
    features.mkdir(parents=True)
    (features / "results.json").write_text(json.dumps({"finished": True}))
    write_provenance(features, make_provenance(config=CONFIG, note=note, checkpoint_path=checkpoint,
                                               phase_i_config_path=checkpoint.parent / "config.yaml",
                                               phase_ii_config={}, features_dir=features))
    for phase, top1 in (("phase_iii_offline", 70.0), ("phase_iii_offline-none", 68.0)):
        path = write_results(root, phase, note, top1=top1)
        path.write_text(json.dumps({**json.loads(path.read_text()), "phase_i_checkpoint": str(checkpoint.resolve()),
                                    "phase_i_checkpoint_sha256": sha256_file(checkpoint)}))
    return checkpoint


def test_a_phase_iii_run_older_than_both_phase_i_and_phase_ii_is_refused(tmp_path):
    """Phase I and phase II both re-run after FSA: they agree with each other, and the sha256 the phase III
    runs recorded is what shows them stale."""
    from engine.phase_ii_outputs import make_provenance, write_provenance

    for note in NOTES:
        write_chain(tmp_path, note)
    checkpoint = tmp_path / "checkpoints/phase_i" / CONFIG / "seed1" / "best_model.pt"
    checkpoint.write_bytes(b"phase I weights, retrained")
    features = tmp_path / "features" / CONFIG / "seed1"
    write_provenance(features, make_provenance(config=CONFIG, note="seed1", checkpoint_path=checkpoint,
                                               phase_i_config_path=checkpoint.parent / "config.yaml",
                                               phase_ii_config={}, features_dir=features))
    code, err = run_main_in_process("report.py", "--config", CONFIG, "--notes", *NOTES, cwd=tmp_path)
    assert code == 2 and err.startswith("error: 2 phase III run(s) no longer pair") and "Traceback" not in err, err
    assert "trained from a phase I checkpoint with other content" in err and "seed0'" not in err
    build_report(CONFIG, ["seed0", "seed2"], tmp_path, echo=False)


def test_a_phase_iii_run_of_a_retrained_phase_i_run_is_refused(tmp_path):
    checkpoints = {note: write_chain(tmp_path, note) for note in NOTES}
    build_report(CONFIG, NOTES, tmp_path, echo=False)  # every FSA run starts from its note's phase I model
    checkpoints["seed1"].write_bytes(b"phase I weights, retrained")  # phase I of seed1 overwritten after FSA ran
    write_results(tmp_path, "phase_i", "seed1", top1=50.0)
    code, err = run_main_in_process("report.py", "--config", CONFIG, "--notes", *NOTES, cwd=tmp_path)
    assert code == 2 and err.startswith("error: 2 phase III run(s) no longer pair") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1  # one paragraph
    assert (f"Note 'seed1', phase I checkpoint {checkpoints['seed1'].resolve()}: phase II outputs were made from a "
            f"different phase I checkpoint") in err
    assert (f"Rerun python phase_ii_extract_feature.py --config {CONFIG} --note seed1 --overwrite; then rerun each phase "
            f"III run trained from it: row 'cRT control (offline, no fusion)' (checkpoints/phase_iii_offline-none/"
            f"{CONFIG}/seed1): python phase_iii_offline_train_or_test.py --config {CONFIG} --note seed1 --opts "
            f"finetune.generator=none --overwrite; row 'FSA offline' (checkpoints/phase_iii_offline/{CONFIG}/seed1): "
            f"python phase_iii_offline_train_or_test.py --config {CONFIG} --note seed1 --overwrite.") in err
    assert err.count("phase_ii_extract_feature.py") == 1  # the shared cause told once, for both runs
    assert f"build the report without note(s) seed1: python report.py --config {CONFIG} --notes seed0 seed2." in err
    assert "seed0'" not in err and "seed2'" not in err and "seed0 --overwrite" not in err  # runs that pair: not named
    assert list((tmp_path / "reports").rglob("report.json")) == [report_dir(CONFIG, NOTES, tmp_path) / "report.json"]
    build_report(CONFIG, ["seed0", "seed2"], tmp_path, echo=False)  # the suggested report is built


def test_a_recorded_checkpoint_path_that_moved_is_checked_as_phase_iii_does(tmp_path):
    """A project moved elsewhere: the absolute phase_i_checkpoint of the FSA run is gone, so (as phase III's
    read_phase_ii) the phase I run of the note is checked; a pruned checkpoint leaves nothing to check."""
    checkpoint = write_chain(tmp_path, "default")
    path = tmp_path / "checkpoints/phase_iii_offline" / CONFIG / "default/results.json"
    path.write_text(json.dumps({**json.loads(path.read_text()),
                                "phase_i_checkpoint": f"/old/place/checkpoints/phase_i/{CONFIG}/default/best_model.pt"}))
    build_report(CONFIG, ["default"], tmp_path, echo=False)
    checkpoint.write_bytes(b"phase I weights, retrained")
    with pytest.raises(UserError, match=r"^2 phase III run\(s\) no longer pair"):
        build_report(CONFIG, ["default"], tmp_path, echo=False)
    checkpoint.unlink()
    build_report(CONFIG, ["default"], tmp_path, echo=False)


def test_phase_iii_runs_of_an_upstream_note_are_checked_against_that_notes_phase_i(tmp_path):
    """A sweep point's phase III runs (``--upstream-note``) read the phase I / II of the base note: the check
    follows the recorded ``upstream_note``, so they pair until that phase I run changes, and the fix reruns
    them with the same --upstream-note."""
    checkpoint = write_chain(tmp_path, "seed0")
    for phase in ("phase_iii_offline", "phase_iii_offline-none"):
        base = json.loads((tmp_path / "checkpoints" / phase / CONFIG / "seed0/results.json").read_text())
        point = write_results(tmp_path, phase, "point1", top1=71.0)
        point.write_text(json.dumps({**json.loads(point.read_text()), "upstream_note": "seed0",
                                     "phase_i_checkpoint": base["phase_i_checkpoint"],
                                     "phase_i_checkpoint_sha256": base["phase_i_checkpoint_sha256"]}))
    build_report(CONFIG, ["point1"], tmp_path, echo=False)  # no phase I / II of its own: read those of seed0
    checkpoint.write_bytes(b"phase I weights, retrained")
    with pytest.raises(UserError) as error:
        build_report(CONFIG, ["point1"], tmp_path, echo=False)
    message = str(error.value)
    assert message.startswith("2 phase III run(s) no longer pair")
    assert ("Note 'point1' (its phase III runs read the phase I / II of note 'seed0'), phase I checkpoint "
            f"{checkpoint.resolve()}: phase II outputs were made from a different phase I checkpoint") in message
    assert (f"python phase_iii_offline_train_or_test.py --config {CONFIG} --note point1 --upstream-note seed0 "
            f"--overwrite.") in message


def test_runs_with_other_data_model_or_class_counts_are_refused(fake_runs):
    for note in NOTES:
        write_config(fake_runs, "phase_i", note, seed=int(note[-1]))  # the seed may differ
    write_config(fake_runs, "phase_iii_offline-none", "seed0", seed=0, finetune={"lr": 0.01})  # no dataset section
    build_report(CONFIG, NOTES, fake_runs, echo=False)
    # another row may have another model section (a cosine classifier); a data location is not the data
    write_results(fake_runs, "phase_i-cosine_ce", "seed0", top1=61.0)
    write_config(fake_runs, "phase_i-cosine_ce", "seed0", model={"arch": "resnet8", "classifier": "cosine"},
                 dataset={"name": "synthetic-LT", "imbalance": 100.0, "root": "/elsewhere"})
    build_report(CONFIG, NOTES, fake_runs, echo=False)

    write_config(fake_runs, "phase_i", "seed1", dataset={"name": "synthetic-LT", "imbalance": 10.0, "root": None})
    write_config(fake_runs, "phase_i", "seed2", model={"arch": "resnet32", "classifier": "linear"})
    path = fake_runs / "checkpoints/phase_iii_offline" / CONFIG / "seed1/results.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "train_counts": [120, 50, 10, 5, 5]}))
    code, err = run_main_in_process("report.py", "--config", CONFIG, "--notes", *NOTES, cwd=fake_runs)
    assert code == 2 and err.startswith("error: 3 run(s) of this report were made with other settings") \
        and "Traceback" not in err
    assert (f"Phase I baseline (CE), note 'seed1' (checkpoints/phase_i/{CONFIG}/seed1) differs from Phase I baseline "
            f"(CE), note 'seed0' in dataset.imbalance") in err
    assert "note 'seed2' (checkpoints/phase_i/fake/seed2) differs from Phase I baseline (CE), note 'seed0' in model.arch" in err
    assert "FSA offline, note 'seed1' (checkpoints/phase_iii_offline/fake/seed1) differs from Phase I baseline (CE), " \
           "note 'seed0' in train_counts" in err
    for allowed in ("in seed", ", seed", "dataset.root", "model.classifier"):  # the seed, a location, another row
        assert allowed not in err
    assert f"e.g. python report.py --config {CONFIG} --notes seed0, or rerun" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("value", ["71.5", True, float("nan"), float("inf"), {"mean": 71.5}, [71.5]])
def test_a_metric_that_is_not_a_finite_number_is_an_error(fake_runs, value):
    path = fake_runs / "checkpoints/phase_iii_offline" / CONFIG / "seed1/results.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "top1": value}))
    code, err = run_main_in_process("report.py", "--config", CONFIG, "--notes", *NOTES, cwd=fake_runs)
    assert code == 2 and err.startswith("error: cannot read the results.json of 1 run(s)") and "Traceback" not in err
    assert f"checkpoints/phase_iii_offline/{CONFIG}/seed1/results.json (top1 is {value!r}: not a finite number" in err
    assert f"python phase_iii_offline_train_or_test.py --config {CONFIG} --note seed1 --overwrite" in err
    assert not (fake_runs / "reports").exists()


def test_each_note_set_has_its_own_report_folder(fake_runs):
    write_results(fake_runs, "phase_i", "default", top1=55.5)
    build_report(CONFIG, NOTES, fake_runs, echo=False)
    build_report(CONFIG, ["seed2", "seed0"], fake_runs, echo=False)
    build_report(CONFIG, ["default"], fake_runs, echo=False)
    reports = fake_runs / "reports" / CONFIG
    assert sorted(p.name for p in reports.iterdir()) == ["default", "seed0+seed1+seed2", "seed0+seed2"]
    for notes, folder in ((NOTES, "seed0+seed1+seed2"), (["seed2", "seed0"], "seed0+seed2"), (["default"], "default")):
        assert report_dir(CONFIG, notes, fake_runs) == reports / folder
        assert json.loads((reports / folder / "report.json").read_text())["notes"] == notes  # none overwritten
        assert all((reports / folder / name).is_file() for name in ("ablation.md", "ablation.csv", "ablation.png",
                                                                     "per_class.png"))
        assert is_up_to_date(CONFIG, notes, fake_runs)
    assert "| Phase I baseline (CE) | 62.00 ± 2.00 |" in (reports / "seed0+seed1+seed2/ablation.md").read_text()
    assert "| Phase I baseline (CE) | 55.50 |" in (reports / "default/ablation.md").read_text()


def test_a_long_note_set_is_a_readable_prefix_and_a_hash():
    from utils.layout import notes_folder
    from utils.layout import MAX_NAME_LENGTH

    notes = [f"experiment-with-a-long-name-seed{i}" for i in range(10)]
    name = notes_folder(notes)
    assert len(name) == MAX_NAME_LENGTH and name.startswith("experiment-with-a-long-name-seed0+experiment")
    assert notes_folder(list(reversed(notes))) == name  # a set: the order given does not matter
    assert notes_folder(notes[:-1]) != name and len({notes_folder(notes[:k]) for k in range(3, 11)}) == 8
    assert notes_folder(["default"]) == "default" and notes_folder(["b", "a", "b"]) == "a+b"


# ------------------------------------------------------------------------------------------------
# Code versions, ablation.csv ids and cost, variants side by side
# ------------------------------------------------------------------------------------------------
def set_provenance(root: Path, phase: str, note: str, commit: str | None, dirty: bool | None) -> None:
    path = root / "checkpoints" / phase / CONFIG / note / "results.json"
    path.write_text(json.dumps({**json.loads(path.read_text()),
                                "provenance": {"git_commit": commit, "git_dirty": dirty, "python": "3.11"}}))


ROWS_OF_FAKE_RUNS = (("phase_i", NOTES), ("phase_iii_offline-none", NOTES), ("phase_iii_offline", NOTES[:2]),
                     ("phase_iii_online-mine", ["seed1"]))


def test_runs_of_one_commit_give_one_line_and_mixed_commits_are_listed(fake_runs):
    one, other = "a" * 40, "0123456789abcdef" * 2 + "01234567"
    for phase, notes in ROWS_OF_FAKE_RUNS:
        for note in notes:
            set_provenance(fake_runs, phase, note, one, False)
    data = build_report(CONFIG, NOTES, fake_runs, echo=False)
    markdown = (report_dir(CONFIG, NOTES, fake_runs) / "ablation.md").read_text()
    assert f"Code: every run from commit `{'a' * 12}` (clean tree)." in markdown and "## Code versions" not in markdown
    assert data["code_versions"]["mixed"] is False
    for phase, notes in ROWS_OF_FAKE_RUNS:  # one commit, but a dirty tree pins no code: said as if mixed
        for note in notes:
            set_provenance(fake_runs, phase, note, one, True)
    versions = build_report(CONFIG, NOTES, fake_runs, echo=False)["code_versions"]
    assert versions["mixed"] is True and len(versions["versions"]) == 1
    for phase, notes in ROWS_OF_FAKE_RUNS:
        for note in notes:
            set_provenance(fake_runs, phase, note, one, False)

    set_provenance(fake_runs, "phase_i", "seed2", other, False)               # another commit
    set_provenance(fake_runs, "phase_iii_offline-none", "seed2", other, False)
    set_provenance(fake_runs, "phase_iii_offline", "seed1", one, True)       # uncommitted changes
    data = build_report(CONFIG, NOTES, fake_runs, echo=False)
    markdown = (report_dir(CONFIG, NOTES, fake_runs) / "ablation.md").read_text()
    section = markdown.split("## Code versions")[1].split("\n\n## ")[0]
    assert "3 code version(s)" in section and "some with uncommitted changes" in section
    assert (f"- `{'a' * 12}` (clean tree): seed0: all rows; seed1: Phase I baseline (CE), cRT control (offline, no "
            f"fusion), phase_iii_online-mine") in section
    assert "- `0123456789ab` (clean tree): seed2: all rows" in section
    assert f"- `{'a' * 12}` + uncommitted changes: seed1: FSA offline" in section
    versions = data["code_versions"]
    assert versions["mixed"] is True
    assert [(v["short"], v["dirty"], v["runs"]) for v in versions["versions"]] == [
        ("a" * 12, False, {"seed0": ["ce", "control_offline", "fsa_offline"], "seed1": ["ce", "control_offline",
                                                                                       "phase_iii_online-mine"]}),
        ("0123456789ab", False, {"seed2": ["ce", "control_offline"]}),
        ("a" * 12, True, {"seed1": ["fsa_offline"]})]
    assert versions["versions"][1]["commit"] == other


def test_runs_without_provenance_are_unknown_not_an_error(fake_runs):
    data = build_report(CONFIG, NOTES, fake_runs, echo=False)  # no run records provenance
    markdown = (report_dir(CONFIG, NOTES, fake_runs) / "ablation.md").read_text()
    assert "Code version of the runs: unknown (no provenance in results.json: runs made before it was recorded)." \
        in markdown
    assert data["code_versions"] == {"mixed": False, "versions": [
        {"commit": None, "short": "unknown", "dirty": None, "runs": {
            "seed0": ["ce", "control_offline", "fsa_offline"],
            "seed1": ["ce", "control_offline", "fsa_offline", "phase_iii_online-mine"],
            "seed2": ["ce", "control_offline"]}}]}
    set_provenance(fake_runs, "phase_i", "seed0", "b" * 40, None)  # one run recorded: the others may differ
    build_report(CONFIG, NOTES, fake_runs, echo=False)
    section = (report_dir(CONFIG, NOTES, fake_runs) / "ablation.md").read_text().split("## Code versions")[1]
    assert f"- `{'b' * 12}` (tree state not recorded): seed0: Phase I baseline (CE)" in section
    assert "- unknown (no provenance in results.json: runs made before it was recorded): seed0: cRT control" in section


def test_csv_carries_each_rows_id_and_training_cost(fake_runs):
    for note, seen, wall in zip(NOTES, (1000, 1000, 1300), (10.0, 12.0, 14.0)):
        path = fake_runs / "checkpoints/phase_i" / CONFIG / note / "results.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "samples_seen": seen, "wall_time_s": wall}))
    data = build_report(CONFIG, NOTES, fake_runs, echo=False)
    with open(report_dir(CONFIG, NOTES, fake_runs) / "ablation.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == [r["id"] or "" for r in data["rows"]] == ["ce", "control_offline", "fsa_offline", ""]
    p1 = rows[0]
    assert float(p1["samples_seen_mean"]) == pytest.approx(1100.0) and float(p1["wall_time_s_mean"]) == pytest.approx(12.0)
    assert float(p1["wall_time_s_std"]) == pytest.approx(2.0)
    assert float(p1["total_samples_seen_mean"]) == pytest.approx(1100.0)  # phase I is built from nothing else
    assert float(p1["total_wall_time_s_mean"]) == pytest.approx(data["rows"][0]["cost"]["total_wall_time_s"]["mean"])
    assert rows[2]["samples_seen_mean"] == "" and rows[2]["total_wall_time_s_mean"] == ""  # not recorded: empty


@pytest.fixture()
def variant_runs(tmp_path) -> Path:
    """Variant default (notes seed0..2) and lr05 (lr05-seed0..2), as pipeline.py --seeds 0 1 2 [--note lr05]
    names them; FSA offline of default misses seed2; lr05-seed3 was not asked for."""
    for k, note in enumerate(NOTES):
        write_results(tmp_path, "phase_i", note, top1=(60.0, 62.0, 64.0)[k], tail=20.0, medium=40.0)
        write_results(tmp_path, "phase_i", f"lr05-{note}", top1=(61.0, 65.0, 66.0)[k], tail=(25.0, 27.0, 20.0)[k],
                      medium=41.0)
        write_config(tmp_path, "phase_i", note, seed=k, train={"lr": 0.1})
        write_config(tmp_path, "phase_i", f"lr05-{note}", seed=k, train={"lr": 0.05})
        write_results(tmp_path, "phase_iii_offline", f"lr05-{note}", top1=70.0 + k, tail=40.0)
    for k, note in enumerate(NOTES[:2]):
        write_results(tmp_path, "phase_iii_offline", note, top1=(69.0, 73.0)[k], tail=40.0)
    write_results(tmp_path, "phase_i", "lr05-seed3", top1=99.0)
    return tmp_path


def test_variants_side_by_side_pair_by_seed_against_a_hand_computation(variant_runs, capsys):
    code, err = run_main_in_process("report.py", "--config", CONFIG, "--variants", "default", "lr05",
                                    "--seeds", "0", "1", "2", cwd=variant_runs)
    assert code == 0, err
    out = variant_runs / "reports" / CONFIG / "default,lr05@seed0+seed1+seed2"
    data = json.loads((out / "report.json").read_text())
    assert data["notes"] == {"default": NOTES, "lr05": ["lr05-seed0", "lr05-seed1", "lr05-seed2"]}
    paired = {(d["method"], d["metric"]): d for d in data["paired"]}
    # phase I top1: lr05 61/65/66 - default 60/62/64 = 1, 3, 2: mean 2, sd 1, half-width 4.302653 / sqrt(3)
    top1 = paired[("Phase I baseline (CE) @ lr05", "top1")]
    assert top1["reference"] == "Phase I baseline (CE) @ default"
    assert top1["per_note"] == {"seed0": 1.0, "seed1": 3.0, "seed2": 2.0}
    assert top1["ci95"] == pytest.approx([2 - 2.484138, 2 + 2.484138], abs=2e-4)
    # tail: 25/27/20 - 20 = 5, 7, 0: mean 4, sd sqrt(13), half-width 4.302653 x sqrt(13) / sqrt(3) = 8.956642
    tail = paired[("Phase I baseline (CE) @ lr05", "tail")]
    assert tail["mean"] == pytest.approx(4.0) and tail["ci95"] == pytest.approx([4 - 8.956642, 4 + 8.956642], abs=2e-4)
    # FSA offline: seed2 has no default run, so two pairs: 70 - 69, 71 - 73
    fsa = paired[("FSA offline @ lr05", "top1")]
    assert fsa["per_note"] == {"seed0": 1.0, "seed1": -2.0} and fsa["n"] == 2
    markdown = (out / "ablation.md").read_text()
    assert markdown.strip() in capsys.readouterr().out
    header = next(line for line in markdown.splitlines() if line.startswith("| method"))
    assert header.startswith("| method | default: top1 | default: many |") and "| lr05: top1 |" in header
    assert "| Phase I baseline (CE) | 62.00 ± 2.00 | — | 40.00 ± 0.00 |" in markdown
    assert "| FSA offline | 71.00 ± 2.83 |" in markdown and "| 2 | 71.00 ± 1.00 |" in markdown  # n per variant
    assert "`lr05`: train.lr" in markdown  # the saved setting that makes the variant
    assert "[-0.48, +4.48]" in markdown and (out / "forest.png").is_file()
    assert data["files"]["forest.png"] == f"reports/{CONFIG}/default,lr05@seed0+seed1+seed2/forest.png"
    with open(out / "ablation.csv", newline="") as f:
        lines = [(r["id"], r["variant"], r["n"]) for r in csv.DictReader(f)]
    assert lines == [("ce", "default", "3"), ("ce", "lr05", "3"), ("fsa_offline", "default", "2"),
                     ("fsa_offline", "lr05", "3")]


def test_variants_without_seeds_pair_the_notes_themselves(variant_runs):
    from analysis.report import build_variant_report, variant_notes, variants_folder

    assert variant_notes("default", None) == ["default"] and variant_notes("lr05", [0, 2]) == ["lr05-seed0", "lr05-seed2"]
    assert variant_notes("default", [1]) == ["seed1"]
    assert variants_folder(["lr05", "default"], None) == "lr05,default"  # the first is the reference
    write_results(variant_runs, "phase_i", "default", top1=50.0)
    write_results(variant_runs, "phase_i", "lr05", top1=52.5)
    data = build_variant_report(CONFIG, ["default", "lr05"], None, variant_runs, echo=False)
    (d,) = [d for d in data["paired"] if d["metric"] == "top1"]
    assert d["per_note"] == {"single run": 2.5} and d["ci95"] is None
    with pytest.raises(UserError, match=r"No finished run of variant\(s\) lr5 .* lr5: lr5-seed0, lr5-seed1"):
        build_variant_report(CONFIG, ["default", "lr5"], [0, 1], variant_runs, echo=False)  # a typo is no empty column
    with pytest.raises(UserError, match="--variants needs two or more variants"):
        build_variant_report(CONFIG, ["lr05"], [0], variant_runs, echo=False)
    code, err = run_main_in_process("report.py", "--config", CONFIG, "--variants", "default", "lr05", "--pairs",
                                    "fsa_offline:ce", cwd=variant_runs)
    assert code == 2 and "--pairs compares rows within one note set" in err
    code, err = run_main_in_process("report.py", "--config", CONFIG, "--seeds", "0", "1", "2", cwd=variant_runs)
    assert code == 0, err  # --seeds alone: the notes seed0 seed1 seed2
    assert report_dir(CONFIG, NOTES, variant_runs).joinpath("report.json").is_file()


def test_a_report_of_an_older_format_is_not_up_to_date(fake_runs):
    build_report(CONFIG, NOTES, fake_runs, echo=False)
    path = report_dir(CONFIG, NOTES, fake_runs) / "report.json"
    data = json.loads(path.read_text())
    assert is_up_to_date(CONFIG, NOTES, fake_runs)
    path.write_text(json.dumps({**data, "format": None}))
    assert not is_up_to_date(CONFIG, NOTES, fake_runs)
    path.write_text(json.dumps(data))
    (report_dir(CONFIG, NOTES, fake_runs) / "forest.png").unlink()  # a figure it lists is gone
    assert not is_up_to_date(CONFIG, NOTES, fake_runs)
