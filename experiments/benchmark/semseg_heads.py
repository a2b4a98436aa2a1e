"""Forward cost on CPU of two semantic segmentation heads at the embedded size (issue 26):
the paper's dilated FCN head (detection.semantic_seg.DilatedFCNHead, one stride-16 map) against
Detectron2's SemSegFPNHead (p2-p5, common stride 4), each on the embedded R18w16 FPN backbone
(configs/detection/embedded_voc_R_18w16_FPN.yaml: 80-px input, FPN 32 channels, batch 8).

    OMP_NUM_THREADS=1 python -m experiments.benchmark.semseg_heads [--reps 20]

Prints one JSON object: per head, its parameters, fvcore's FLOP count of the head alone, and the
median seconds of the head alone and of the whole model's forward (eval) and training step
(forward + backward) per batch, on one thread.
"""

import argparse
import json
import os
import statistics
import time

import torch
from detectron2.modeling import build_model
from detectron2.structures import ImageList
from fvcore.nn import FlopCountAnalysis

from detection.config import load_cfg

CONFIG = os.path.join("configs", "detection", "embedded_voc_R_18w16_FPN.yaml")
CLASSES = 11  # the embedded set's 10 classes + background
HEADS = {
    "DilatedFCNHead": ["MODEL.SEM_SEG_HEAD.IN_FEATURES", "['p4']"],
    "SemSegFPNHead": [
        "MODEL.SEM_SEG_HEAD.IN_FEATURES",
        "['p2', 'p3', 'p4', 'p5']",
        "MODEL.SEM_SEG_HEAD.COMMON_STRIDE",
        "4",
    ],
}


def _median_seconds(fn, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name, opts, reps, batch=8, size=80):
    cfg = load_cfg(
        CONFIG,
        [
            "MODEL.META_ARCHITECTURE",
            "SemanticSegmentor",
            "MODEL.SEM_SEG_HEAD.NAME",
            name,
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
            str(CLASSES),
            "MODEL.SEM_SEG_HEAD.CONVS_DIM",
            "32",  # the embedded FPN's width
            "MODEL.SEM_SEG_HEAD.NORM",
            "BN",
            "MODEL.DEVICE",
            "cpu",
            *opts,
        ],
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    gen = torch.Generator().manual_seed(0)
    inputs = [
        {
            "image": torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=gen),
            "sem_seg": torch.randint(0, CLASSES, (size, size), generator=gen),
            "height": size,
            "width": size,
        }
        for _ in range(batch)
    ]
    head = model.sem_seg_head
    with torch.no_grad():
        model.eval()
        # SemanticSegmentor.forward's own preprocessing
        images = [(x["image"].float() - model.pixel_mean) / model.pixel_std for x in inputs]
        images = ImageList.from_tensors(images, model.backbone.size_divisibility).tensor
        features = model.backbone(images)
        flops = FlopCountAnalysis(head, (features,))
        flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        gflops = flops.total() / 1e9  # traced now, in eval mode (the count is lazy)
        head_s = _median_seconds(lambda: head(features), reps)
        eval_s = _median_seconds(lambda: model(inputs), reps)
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        sum(model(inputs).values()).backward()

    train_s = _median_seconds(step, reps)
    return {
        "head_params": sum(p.numel() for p in head.parameters()),
        "head_gflops": gflops,
        "head_forward_s": head_s,
        "model_forward_s": eval_s,
        "model_train_step_s": train_s,
        "in_features": list(cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = {"config": CONFIG, "batch": 8, "input_px": 80, "threads": torch.get_num_threads()}
    out["heads"] = {name: measure(name, opts, args.reps) for name, opts in HEADS.items()}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
