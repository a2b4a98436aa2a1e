"""Your own detection data and checkpoints (issue 28): a COCO JSON or a VOC-layout folder named
from the command line (``DATASETS.REGISTER``), its class count checked at start against
``MODEL.ROI_HEADS.NUM_CLASSES`` for every TRAIN and TEST set, the toolkit's annotation checks on it.
"""

import json
import os
import shutil

import pytest
from conftest import load_tool
from test_train_net import TINY, VOC_CFG

NEW_IDS = (1, 2, 5)  # three classes whose ids are not contiguous: Detectron2 maps them to 0, 1, 2
NAMES = ("disk", "square", "star")


def write_coco_set(synthetic_root, folder):
    """A fresh COCO set of 3 classes (ids 1, 2, 5) from the embedded scenes: every object keeps
    its box, its class becomes one of the three. Returns {split: (json file, image folder)}."""
    images = os.path.join(folder, "images")
    os.makedirs(images, exist_ok=True)
    sets = {}
    for split in ("trainval", "test"):
        src = os.path.join(synthetic_root, "coco", "annotations", f"instances_{split}.json")
        with open(src) as f:
            data = json.load(f)
        for image in data["images"]:
            shutil.copy(
                os.path.join(synthetic_root, "VOC2007", "JPEGImages", image["file_name"]), images
            )
        for ann in data["annotations"]:
            ann["category_id"] = NEW_IDS[(ann["category_id"] - 1) % 3]
        data["categories"] = [{"id": i, "name": n} for i, n in zip(NEW_IDS, NAMES)]
        path = os.path.join(folder, f"{split}.json")
        with open(path, "w") as f:
            json.dump(data, f)
        sets[split] = (path, images)
    return sets


def register_opts(sets, prefix="mine"):
    """``DATASETS.REGISTER`` and TRAIN / TEST overrides naming ``sets`` as a user types them."""
    entries = [[f"{prefix}_{split}", "coco", *sets[split]] for split in ("trainval", "test")]
    return [
        "DATASETS.REGISTER",
        repr(entries),
        "DATASETS.TRAIN",
        f"('{prefix}_trainval',)",
        "DATASETS.TEST",
        f"('{prefix}_test',)",
    ]


def test_an_unknown_dataset_name_says_how_to_register_one(synthetic_datasets, tmp_path, capsys):
    main = load_tool("train_net").main
    argv = ["--config-file", VOC_CFG, "DATASETS.TRAIN", "('my_train',)"]
    assert main(argv + ["OUTPUT_DIR", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "'my_train' is not a registered dataset" in err and "DATASETS.REGISTER" in err
    assert not os.path.exists(tmp_path / "o")


def test_a_registered_coco_set_gets_its_classes_checked_at_start_for_train_and_test(
    synthetic_root, tmp_path, capsys
):
    from detectron2.data import MetadataCatalog

    sets = write_coco_set(synthetic_root, str(tmp_path / "data"))
    main = load_tool("train_net").main
    out = str(tmp_path / "o")
    # NUM_CLASSES left at the config's 10: one line at start naming the set and the value to set
    assert main(["--config-file", VOC_CFG, *register_opts(sets), "OUTPUT_DIR", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "train_net.py: error: MODEL.ROI_HEADS.NUM_CLASSES is 10 but mine_trainval has 3 classes; "
        "set MODEL.ROI_HEADS.NUM_CLASSES 3"
    )
    assert not os.path.exists(out)  # nothing trained, nothing left behind
    meta = MetadataCatalog.get("mine_trainval")
    assert meta.thing_classes == list(NAMES)
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 5: 2}
    # the TEST set is checked too: a train set of 3 classes beside a test set of 10
    opts = register_opts(sets)[:4] + ["DATASETS.TEST", "('synthetic_voc_test',)"]
    argv = ["--config-file", VOC_CFG, *opts, "MODEL.ROI_HEADS.NUM_CLASSES", "3"]
    assert main(argv + ["OUTPUT_DIR", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        "MODEL.ROI_HEADS.NUM_CLASSES is 3 but synthetic_voc_test has 10 classes; "
        "set MODEL.ROI_HEADS.NUM_CLASSES 10"
    ), err


def test_train_and_test_sets_of_other_classes_are_one_line(synthetic_root, tmp_path, capsys):
    sets = write_coco_set(synthetic_root, str(tmp_path / "data"))
    path = sets["test"][0]
    with open(path) as f:
        data = json.load(f)
    data["categories"][1]["name"] = "ring"  # id 2: square in the train file
    with open(path, "w") as f:
        json.dump(data, f)
    argv = ["--config-file", VOC_CFG, *register_opts(sets, "classes")]
    argv += ["MODEL.ROI_HEADS.NUM_CLASSES", "3", "OUTPUT_DIR", str(tmp_path / "o")]
    assert load_tool("train_net").main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "train_net.py: error: DATASETS: class 1 of classes_test is 'ring' but of classes_trainval "
        "'square'; TRAIN and TEST sets must share one class list (names and order; a COCO file's "
        "categories in id order)"
    )


def test_registered_sets_get_the_toolkits_annotation_checks(synthetic_root, tmp_path, capsys):
    sets = write_coco_set(synthetic_root, str(tmp_path / "data"))
    path = sets["test"][0]
    with open(path) as f:
        data = json.load(f)
    data["annotations"][0]["bbox"] = [5, 5, -3, 4]  # negative width
    with open(path, "w") as f:
        json.dump(data, f)
    argv = ["--config-file", VOC_CFG, *register_opts(sets, "checked")]
    argv += ["MODEL.ROI_HEADS.NUM_CLASSES", "3", "OUTPUT_DIR", str(tmp_path / "o")]
    assert load_tool("train_net").main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and path in err and "Traceback" not in err, err


def test_a_voc_layout_folder_registers_with_classes_from_its_annotations(synthetic_root, tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from detection.config import load_cfg
    from detection.data.datasets import CLASS_NAMES
    from detection.trainer import prepare_datasets

    voc = str(tmp_path / "myvoc")
    shutil.copytree(os.path.join(synthetic_root, "VOC2007"), voc)
    entries = [["myvoc_train", "voc", voc, "trainval"], ["myvoc_test", "voc", voc, "test"]]
    opts = ["DATASETS.REGISTER", repr(entries)]
    opts += ["DATASETS.TRAIN", "('myvoc_train',)", "DATASETS.TEST", "('myvoc_test',)"]
    cfg = load_cfg(VOC_CFG, opts + ["MODEL.ROI_HEADS.NUM_CLASSES", "4"])
    with pytest.raises(ValueError, match="myvoc_train has 10 classes; set .* 10"):
        prepare_datasets(cfg)
    prepare_datasets(load_cfg(VOC_CFG, opts))  # again in this process: the same files, kept
    meta = MetadataCatalog.get("myvoc_test")
    assert meta.thing_classes == sorted(CLASS_NAMES) and meta.evaluator_type == "pascal_voc"
    dicts = DatasetCatalog.get("myvoc_test")  # the checked loader, boxes as Detectron2 loads them
    assert len(dicts) == 12 and all(d["annotations"] for d in dicts)
    assert DatasetCatalog["myvoc_test"].func.__name__ == "load_voc_checked"
    # a later config in this process naming other files under the same name re-points it
    other = str(tmp_path / "other")
    shutil.copytree(voc, other)
    prepare_datasets(load_cfg(VOC_CFG, [opts[0], repr([["myvoc_test", "voc", other, "test"]])]))
    assert MetadataCatalog.get("myvoc_test").dirname == other


def test_bad_register_entries_are_one_line_naming_the_entry(synthetic_root, tmp_path, capsys):
    main = load_tool("train_net").main
    cases = [
        ("[['a', 'yolo', 'x.json', 'img']]", "DATASETS.REGISTER[0]", "not 'yolo'"),
        ("[['a', 'coco', 'nope.json', '.']]", "DATASETS.REGISTER[0]", "nope.json not found"),
        ("[['a', 'coco']]", "DATASETS.REGISTER[0]", "expected [name, 'coco'"),
        (f"[['a', 'voc', '{tmp_path}', 'train']]", "DATASETS.REGISTER[0]", "train.txt not found"),
        (
            f"[['synthetic_voc_test', 'voc', '{synthetic_root}/VOC2007', 'train']]",
            "DATASETS.REGISTER[0]",
            "train.txt not found",
        ),
    ]
    for value, where, message in cases:
        argv = ["--config-file", VOC_CFG, "DATASETS.REGISTER", value]
        assert main(argv + ["OUTPUT_DIR", str(tmp_path / "o")]) == 2, value
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and where in err and message in err, err
    # a name Detectron2 already holds for other files is refused, not silently replaced
    sets = write_coco_set(synthetic_root, str(tmp_path / "data"))
    value = repr([["voc_2007_test", "coco", *sets["test"]]])
    assert main(["--config-file", VOC_CFG, "DATASETS.REGISTER", value]) == 2
    err = capsys.readouterr().err.strip()
    assert "'voc_2007_test' is already a registered dataset" in err, err


def test_a_registered_coco_set_fine_tunes_and_is_scored(synthetic_root, tmp_path):
    sets = write_coco_set(synthetic_root, str(tmp_path / "data"))
    out = str(tmp_path / "run")
    argv = ["--config-file", VOC_CFG, *TINY, *register_opts(sets, "tuned")]
    argv += ["MODEL.ROI_HEADS.NUM_CLASSES", "3", "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", out]
    assert load_tool("train_net").main(argv) == 0
    with open(os.path.join(out, "final_metrics.json")) as f:
        data = json.load(f)
    assert (data["task"], data["dataset"]) == ("coco", "tuned_test")
    assert {"AP", "AP50", "AP75"} <= set(data["metrics"]["bbox"])
    # COCOEvaluator scored the 3 classes under their own ids (no "class=8" failure)
    assert {f"AP-{n}" for n in NAMES} <= set(data["metrics"]["bbox"])


def _torchvision_checkpoint(path, arch="resnet18", seed=0):
    """A torchvision-layout ResNet's state_dict as torchvision saves it (random weights)."""
    import torch

    from moco.modeling.resnet import resnet_encoder

    torch.manual_seed(seed)
    torch.save(resnet_encoder(arch)(num_classes=10).state_dict(), path)
    return str(path)


def _moco_checkpoint(folder, arch="resnet18"):
    """A MoCo checkpoint in the official format, as tools/pretrain.py writes it."""
    from moco import checkpoint as C
    from moco.modeling.moco import MoCo
    from moco.modeling.resnet import resnet_encoder

    model = MoCo(resnet_encoder(arch), dim=16, K=8, mlp=True, shuffle_bn="off")
    return C.save_checkpoint(C.build_checkpoint(model, None, 1, arch), str(folder))


def test_done_when_own_coco_set_two_own_checkpoints_paired_ci_and_trials_csv(
    synthetic_root, tmp_path, monkeypatch, capsys
):
    """Issue 28's done-when, from a fresh folder: a 3-class COCO JSON (ids 1, 2, 5) named on the
    command line; NUM_CLASSES left wrong is one line at start; fixed, it fine-tunes from a
    torchvision and from a MoCo checkpoint (both converted), 2 seeds each; tools/report.py gives
    their paired CI and the per-trial CSV."""
    import csv

    from experiments.report import paired_difference
    from moco.utils.file_io import file_sha256

    monkeypatch.chdir(tmp_path)
    sets = write_coco_set(synthetic_root, "data")
    train_net, convert = load_tool("train_net").main, load_tool("convert_to_d2").main
    register = register_opts({k: [os.path.relpath(p) for p in v] for k, v in sets.items()})
    base = ["--config-file", VOC_CFG, *TINY, *register, "SOLVER.MAX_ITER", "2"]
    assert train_net(base + ["OUTPUT_DIR", "runs/wrong"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("mine_trainval has 3 classes; set MODEL.ROI_HEADS.NUM_CLASSES 3"), err
    assert len(err.splitlines()) == 1 and not os.path.exists("runs/wrong")

    sources = {"tv": _torchvision_checkpoint("resnet18.pth"), "moco": _moco_checkpoint(".")}
    for label, src in sources.items():
        assert convert([src, f"{label}.pkl"]) == 0, capsys.readouterr().err
    for label in sources:
        for seed in (0, 1):
            argv = base + ["MODEL.ROI_HEADS.NUM_CLASSES", "3", "MODEL.WEIGHTS", f"{label}.pkl"]
            argv += ["SEED", str(seed), "OUTPUT_DIR", f"runs/{label}_s{seed}"]
            assert train_net(argv) == 0, capsys.readouterr().err
    capsys.readouterr()

    assert load_tool("report").main(["tv=runs/tv_*", "moco=runs/moco_*", "--output-dir", "r"]) == 0
    printed = capsys.readouterr().out
    ap50 = {}
    for label in sources:
        for seed in (0, 1):
            with open(f"runs/{label}_s{seed}/final_metrics.json") as f:
                ap50[label, seed] = json.load(f)["metrics"]["bbox"]["AP50"]
    n, mean, (lo, hi), p = paired_difference(
        [ap50["tv", s] for s in (0, 1)], [ap50["moco", s] for s in (0, 1)]
    )
    head = f"tv vs moco: AP^bb_50 paired difference {mean:+.2f}, 95% CI [{lo:+.2f}, {hi:+.2f}], "
    assert head + f"one-sided p = {p:.3g} (n = 2 pairs)" in printed, printed
    with open("r/transfer_trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["label"], r["seed"], r["iterations"]) for r in rows] == [
        (label, str(seed), "2") for label in sources for seed in (0, 1)
    ]
    for r in rows:
        assert r["weights_sha256"] == file_sha256(f"{r['label']}.pkl")
        assert float(r["AP^bb_50"]) == pytest.approx(ap50[r["label"], int(r["seed"])], abs=1e-4)


def test_pipeline_inits_an_own_checkpoint_beside_moco_and_random_on_a_registered_set(
    synthetic_root, tmp_path, monkeypatch
):
    """INITS: one's own checkpoint as a row (converted, keyed by its sha256), fine-tuned in the
    same paired trials as MoCo, supervised and random on a registered 3-class COCO set; the
    report pairs every row with every other."""
    from test_pipeline import TINY as PIPELINE_TINY

    from experiments.pipeline import load_pipeline_cfg, run_pipeline

    sets = write_coco_set(synthetic_root, str(tmp_path / "data"))
    mine = _torchvision_checkpoint(tmp_path / "mine.pth", "resnet18_w16", seed=1)
    sup = _torchvision_checkpoint(tmp_path / "sup.pth", "resnet18_w16", seed=2)
    detection = [*TINY, *register_opts(sets), "MODEL.ROI_HEADS.NUM_CLASSES", "3"]
    detection += ["SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()", "TEST.PRECISE_BN.ENABLED", "False"]
    opts = ["RUN_DIR", str(tmp_path / "run"), "DATA.ROOT", str(tmp_path / "synthetic")]
    opts += [*PIPELINE_TINY, "JOBS", "1", "SUPERVISED.WEIGHTS", sup]
    # and a Detectron2 .pkl, used as it is
    mine_pkl = str(tmp_path / "mine_d2.pkl")
    assert load_tool("convert_to_d2").main([mine, mine_pkl]) == 0
    inits = [["mine", mine], ["mine_pkl", mine_pkl]]
    opts += ["INITS", repr(inits), "DETECTION.OPTS", repr(detection)]
    import experiments.report.write as write

    titles, plot_table = [], write.plot_table

    def recorded(table, path, title=None):
        titles.append(title)
        return plot_table(table, path, title=title)

    monkeypatch.setattr(write, "plot_table", recorded)
    paths = run_pipeline(load_pipeline_cfg("configs/pipeline/ci.yaml", opts))
    assert titles == ["Detection transfer"], titles  # the detector never saw the embedded set
    with open(os.path.join(os.path.dirname(paths["md"]), "pipeline_summary.json")) as f:
        summary = json.load(f)
    assert summary["inits"] == {"mine": mine, "mine_pkl": mine_pkl}
    assert not any(s["name"] == "convert_mine_pkl" for s in summary["stages"])
    with open(paths["csv"]) as f:  # the rows: methods, own checkpoints, then the baselines
        assert [line.split(",")[0] for line in f.read().splitlines()[1:]] == [
            "moco",
            "mine",
            "mine_pkl",
            "supervised",
            "random",
        ]
    assert set(summary["comparisons"]) == {
        "moco_vs_mine",
        "moco_vs_mine_pkl",
        "moco_vs_random",
        "moco_vs_supervised",
        "mine_vs_mine_pkl",
        "mine_vs_random",
        "mine_vs_supervised",
        "mine_pkl_vs_random",
        "mine_pkl_vs_supervised",
    }
    assert all(c["n_pairs"] == 2 for c in summary["comparisons"].values())
    for run in summary["runs"]["mine"]:
        with open(os.path.join(run, "final_metrics.json")) as f:
            data = json.load(f)
        assert data["dataset"] == "mine_test" and data["weights"].endswith("mine.pkl")
    text = open(paths["md"]).read()
    assert "- moco vs mine: AP^bb_50 paired difference" in text
    with open(paths["trials_csv"]) as f:
        assert len(f.read().splitlines()) == 1 + 5 * 2
    # the .pkl row loaded the same backbone as the converted one: the same weights, bit for bit
    for a, b in zip(summary["runs"]["mine"], summary["runs"]["mine_pkl"]):
        with (
            open(os.path.join(a, "final_metrics.json")) as f,
            open(os.path.join(b, "final_metrics.json")) as g,
        ):
            ma, mb = json.load(f), json.load(g)
        assert ma["weights_sha256"] == mb["weights_sha256"] and ma["metrics"] == mb["metrics"]
    # the conversion is keyed by the checkpoint's content: a copy elsewhere reuses it
    moved = str(tmp_path / "elsewhere.pth")
    os.rename(mine, moved)
    opts[opts.index("INITS") + 1] = repr([["mine", moved], ["mine_pkl", mine_pkl]])
    run_pipeline(load_pipeline_cfg("configs/pipeline/ci.yaml", opts))
    with open(os.path.join(os.path.dirname(paths["md"]), "pipeline_summary.json")) as f:
        stages = {s["name"]: s["reused"] for s in json.load(f)["stages"]}
    assert stages["convert_mine"] and stages["detect_mine_s1"], stages
    # instead of the pipeline's own pretraining: METHODS [] reports the own rows and baselines
    paths = run_pipeline(load_pipeline_cfg("configs/pipeline/ci.yaml", opts + ["METHODS", "[]"]))
    with open(paths["csv"]) as f:
        rows = [line.split(",")[0] for line in f.read().splitlines()[1:]]
    assert rows == ["mine", "mine_pkl", "supervised", "random"]
    with open(os.path.join(os.path.dirname(paths["md"]), "pipeline_summary.json")) as f:
        summary = json.load(f)
    assert not any(s["name"].startswith("pretrain_") for s in summary["stages"])
    assert all(s["reused"] for s in summary["stages"])  # every trial ran above already


def test_bad_inits_are_one_line_naming_the_entry(tmp_path, capsys):
    ckpt = _torchvision_checkpoint(tmp_path / "mine.pth")
    main = load_tool("pipeline").main
    cases = [
        (["INITS", repr([["moco", ckpt]])], "INITS[0]", "'moco' is taken"),
        (["INITS", repr([["a", ckpt], ["a", ckpt]])], "INITS[1]", "'a' is taken"),
        (["INITS", repr([["mine", str(tmp_path / "no.pth")]])], "INITS[0]", "no.pth not found"),
        (["INITS", repr([["mine"]])], "INITS[0]", "expected a [name, checkpoint] pair"),
        (["INITS", repr([["a/b", ckpt]])], "INITS[0]", "the name must be"),
        (["METHODS", "[]"], "METHODS is empty", "INITS names no checkpoint"),
    ]
    for opts, where, message in cases:
        assert main(["RUN_DIR", str(tmp_path / "run"), *opts]) == 2, opts
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and where in err and message in err, err
    assert not os.path.exists(tmp_path / "run")
    # instead of the pretrained rows: METHODS [] with INITS loads
    from experiments.pipeline import load_pipeline_cfg

    cfg = load_pipeline_cfg(None, ["METHODS", "[]", "INITS", repr([["mine", ckpt]])])
    assert list(cfg.METHODS) == [] and cfg.INITS == [["mine", ckpt]]
