"""Drawing the embedded images: shapes, textures, backgrounds, occlusion, and the visible masks
and boxes that VOC and COCO annotate (rules in :mod:`moco.data.synthetic`).
"""

import math

import cv2
import numpy as np

from moco.data.synthetic.spec import (
    _KIND_CLS,
    _KIND_DET,
    BACKGROUND_POOL,
    CLASS_NAMES,
    CLS_SPLITS,
    DEFORMATION,
    DET_MAX_SIZE,
    DET_MIN_SIZE,
    DIFFICULT_VISIBLE_FRACTION,
    GREY_LEVELS,
    KEYPOINT_UNIT,
    MAX_TILT_DEG,
    MIN_VISIBLE_FRACTION,
    MIN_VISIBLE_PIXELS,
    NOISE_STD,
    TEXTURE_FAMILIES,
    TEXTURE_OF_CLASS,
    VOC_SPLITS,
    SyntheticSpec,
)


def _rng(seed: int, kind: int, split: int, cls: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, kind, split, cls, index]))


def _circle(n: int = 64, r: float = 1.0, dx: float = 0.0) -> np.ndarray:
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    return np.stack([dx + r * np.cos(t), r * np.sin(t)], 1)


def _regular(n: int, r: float = 1.0, phase: float = -np.pi / 2) -> np.ndarray:
    t = phase + np.arange(n) * 2 * np.pi / n
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _shape_parts(name: str, rng: np.random.Generator) -> list[tuple[np.ndarray, bool]]:
    """Unit-size outline of a class as [(polygon (K, 2), is_cut)]; cuts are removed from fills."""
    if name == "disk":
        return [(_circle(), False)]
    if name == "square":
        return [(np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]]), False)]
    if name == "triangle":
        return [(_regular(3), False)]
    if name == "star":
        tips, inner = _regular(5), _regular(5, rng.uniform(0.38, 0.5), -np.pi / 2 + np.pi / 5)
        return [(np.stack([tips, inner], 1).reshape(-1, 2), False)]
    if name == "ring":
        return [(_circle(), False), (_circle(r=rng.uniform(0.45, 0.6)), True)]
    if name == "cross":
        w = rng.uniform(0.25, 0.35)
        pts = [
            (-w, -1),
            (w, -1),
            (w, -w),
            (1, -w),
            (1, w),
            (w, w),
            (w, 1),
            (-w, 1),
            (-w, w),
            (-1, w),
            (-1, -w),
            (-w, -w),
        ]
        return [(np.array(pts, dtype=np.float64), False)]
    if name == "hexagon":
        return [(_regular(6, phase=0.0), False)]
    if name == "crescent":
        return [
            (_circle(), False),
            (_circle(r=rng.uniform(0.8, 0.9), dx=rng.uniform(0.4, 0.55)), True),
        ]
    if name == "arrow":
        w, head = rng.uniform(0.18, 0.28), rng.uniform(0.1, 0.3)
        pts = [(-1, -w), (head, -w), (head, -0.7), (1, 0), (head, 0.7), (head, w), (-1, w)]
        return [(np.array(pts, dtype=np.float64), False)]
    if name == "heart":
        t = np.linspace(0.0, 2 * np.pi, 64, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return [(np.stack([x, y + 2.5], 1) / 16.5, False)]
    raise ValueError(f"unknown shape {name!r}; expected one of {CLASS_NAMES}")


def _place(parts, cx, cy, radius, aspect, angle):
    """Scale (aspect-stretched), rotate and translate unit outlines to pixel coordinates."""
    sx, sy = radius * math.sqrt(aspect), radius / math.sqrt(aspect)
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, s], [-s, c]])
    return [((pts * (sx, sy)) @ rot + (cx, cy), cut) for pts, cut in parts]


def _rasterize(parts, h: int, w: int, ox: int = 0, oy: int = 0) -> np.ndarray:
    """Boolean mask of placed outlines on an h x w canvas whose origin is image pixel (ox, oy)."""
    mask = np.zeros((h, w), np.uint8)
    for pts, cut in parts:  # fills and cuts in order; sub-pixel vertices via shift=4
        q = np.round((pts - (ox, oy) - 0.5) * 16).astype(np.int32)
        cv2.fillPoly(mask, [q], 0 if cut else 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


def _object_masks(parts, h: int, w: int) -> tuple[np.ndarray, bool]:
    """In-image mask and whether the full shape is cut by the image border."""
    pts = np.concatenate([p for p, _ in parts])
    x0, y0 = min(0, int(np.floor(pts[:, 0].min())) - 1), min(0, int(np.floor(pts[:, 1].min())) - 1)
    x1, y1 = max(w, int(np.ceil(pts[:, 0].max())) + 2), max(h, int(np.ceil(pts[:, 1].max())) + 2)
    full = _rasterize(parts, y1 - y0, x1 - x0, x0, y0)
    inside = full[-y0 : -y0 + h, -x0 : -x0 + w]
    return inside.copy(), bool(inside.sum() < full.sum())


def _coords(window, cx: float, cy: float, angle: float):
    x0, y0, x1, y1 = window
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    xx -= cx
    yy -= cy
    c, s = math.cos(angle), math.sin(angle)
    return xx * c + yy * s, -xx * s + yy * c


def _texture(family: str, rng: np.random.Generator, window, cx, cy, angle, size) -> np.ndarray:
    """A {0,1} pattern of the family over ``window`` (x0, y0, x1, y1 exclusive) in the object's
    frame; the period scales with the object's size."""
    p = max(3.0, size * rng.uniform(0.14, 0.26))
    u, v = _coords(window, cx, cy, angle + rng.uniform(-0.3, 0.3))
    h, w = u.shape
    u = u + rng.uniform(0, p)
    v = v + rng.uniform(0, p)
    if family == "stripes":
        t = np.sin(2 * np.pi * u / p) > 0
    elif family == "checker":
        t = (np.floor(u / p) + np.floor(v / p)) % 2 == 0
    elif family == "dots":
        du, dv = np.mod(u, p) - p / 2, np.mod(v, p) - p / 2
        t = du * du + dv * dv < (rng.uniform(0.28, 0.38) * p) ** 2
    elif family == "waves":
        amp, length = p * rng.uniform(0.4, 0.8), p * rng.uniform(2.0, 3.0)
        t = np.sin(2 * np.pi * (u + amp * np.sin(2 * np.pi * v / length)) / p) > 0
    elif family == "grid":
        lw = max(0.6, p * rng.uniform(0.14, 0.22))
        t = (np.abs(np.mod(u, p) - p / 2) < lw) | (np.abs(np.mod(v, p) - p / 2) < lw)
    elif family == "zigzag":
        amp, length = p * rng.uniform(0.6, 1.0), p * rng.uniform(1.2, 2.0)
        s = u + amp * np.abs(np.mod(v / length, 1.0) * 2 - 1)
        t = np.mod(s / p, 1.0) < 0.5
    elif family == "speckle":
        gh, gw = max(2, int(h / (0.7 * p))), max(2, int(w / (0.7 * p)))
        noise = rng.random((gh, gw)).astype(np.float32)
        t = cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC) > 0.5
    elif family == "concentric":
        t = np.mod(np.sqrt(u * u + v * v) / p, 1.0) < 0.5
    elif family == "sunburst":
        t = np.sin(rng.integers(5, 10) * np.arctan2(v, u) + rng.uniform(0, np.pi)) > 0
    elif family == "bricks":
        row = np.floor(v / p)
        lw = max(0.7, p * 0.18)
        t = (np.mod(v, p) > lw) & (np.mod(u + row * p, 2 * p) > lw)
    else:
        raise ValueError(f"unknown texture family {family!r}; expected one of {TEXTURE_FAMILIES}")
    return t.astype(np.float32)


def _window(mask: np.ndarray):
    """Bounding window (x0, y0, x1, y1 exclusive) of a non-empty mask: texture only what is painted."""
    x, y, w, h = cv2.boundingRect(np.ascontiguousarray(mask, dtype=np.uint8))
    return x, y, x + max(w, 1), y + max(h, 1)


def _paint(img, mask, window, pattern, colours, alpha: float = 1.0):
    """Blend a two-colour pattern (covering ``window``) into ``img`` where ``mask`` is set."""
    x0, y0, x1, y1 = window
    sub, m = img[y0:y1, x0:x1], mask[y0:y1, x0:x1]
    t = pattern[m][:, None]
    sub[m] = alpha * (t * colours[0] + (1.0 - t) * colours[1]) + (1.0 - alpha) * sub[m]


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Two colours of ``BACKGROUND_POOL`` blended along a random linear ramp."""
    a, b = BACKGROUND_POOL[rng.choice(len(BACKGROUND_POOL), 2, replace=False)]
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = ((xx / w - 0.5) * math.cos(theta) + (yy / h - 0.5) * math.sin(theta) + 0.5).clip(0, 1)
    return a * (1 - ramp[..., None]) + b * ramp[..., None]


def _sensor_noise(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Mild Gaussian noise; -> uint8."""
    img = img + rng.normal(0.0, NOISE_STD, img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _apply_deform(parts, coef):
    out = []
    for pts, cut in parts:
        theta = np.arctan2(pts[:, 1], pts[:, 0])
        scale = 1 + sum(a * np.sin(k * theta + p) for k, a, p in coef)
        out.append((pts * scale[:, None], cut))
    return out


def _deform(parts, rng: np.random.Generator):
    """Per-instance low-frequency radial deformation of a unit outline (the class stays legible).
    Returns (deformed parts, the coefficients: the keypoints follow the same deformation)."""
    coef = [(k, rng.uniform(0, DEFORMATION), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4)]
    return _apply_deform(parts, coef), coef


def _sample_object(rng, cls: int, h: int, w: int, size: float, cx: float, cy: float, aspect: float):
    name = CLASS_NAMES[cls]
    angle = math.radians(rng.uniform(-MAX_TILT_DEG, MAX_TILT_DEG))
    deformed, coef = _deform(_shape_parts(name, rng), rng)
    parts = _place(deformed, cx, cy, size / 2, aspect, angle)
    # the keypoints: KEYPOINT_UNIT through the outline's deformation and placement (no draws)
    ((keypoints, _),) = _place(
        _apply_deform([(np.array(KEYPOINT_UNIT, np.float64), False)], coef),
        cx,
        cy,
        size / 2,
        aspect,
        angle,
    )
    return {
        "cls": cls,
        "parts": parts,
        "cx": cx,
        "cy": cy,
        "angle": angle,
        "size": size,
        "keypoints": keypoints,
    }


def _draw_object(rng, img: np.ndarray, obj: dict, mask: np.ndarray):
    fam = TEXTURE_OF_CLASS[CLASS_NAMES[obj["cls"]]]
    win = _window(mask)
    pattern = _texture(fam, rng, win, obj["cx"], obj["cy"], obj["angle"], obj["size"])
    grey = GREY_LEVELS[rng.choice(len(GREY_LEVELS), 2, replace=False)]
    _paint(img, mask, win, pattern, (np.full(3, grey[0]), np.full(3, grey[1])))


def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons whose rasterisation (pycocotools) equals ``mask``, holes included.

    Traced on a 4x nearest-upsampled mask so the outline runs just outside the boundary pixel
    centres; each hole is joined to its outline by a zero-width cut (COCO merges polygons by
    union, so a separate hole polygon would fill it).
    """
    k = 4
    up = cv2.resize(mask.astype(np.uint8), None, fx=k, fy=k, interpolation=cv2.INTER_NEAREST)
    contours, hierarchy = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    hierarchy = hierarchy[0]
    polygons = []
    for i, contour in enumerate(contours):
        if hierarchy[i][3] != -1:
            continue  # a hole; spliced into its parent below
        outline = cv2.approxPolyDP(contour, 1.5, True)[:, 0, :]
        child = hierarchy[i][2]
        while child != -1:
            hole = cv2.approxPolyDP(contours[child], 1.5, True)[:, 0, :]
            if len(hole) >= 3:
                d = ((outline[:, None, :] - hole[None, :, :]) ** 2).sum(-1)
                a, b = np.unravel_index(int(np.argmin(d)), d.shape)
                outline = np.concatenate([outline[: a + 1], hole[b:], hole[: b + 1], outline[a:]])
            child = hierarchy[child][0]
        if len(outline) >= 3:  # fewer points enclose nothing (and 2 would read as a COCO box)
            polygons.append([float(x) for x in ((outline + 0.5) / k).ravel()])
    return polygons


def _polygon_area(polygons: list[list[float]]) -> float:
    return float(sum(cv2.contourArea(np.array(p, np.float32).reshape(-1, 2)) for p in polygons))


def render_classification_image(
    spec: SyntheticSpec, split: str, cls: int, index: int
) -> np.ndarray:
    """One RGB uint8 image of class ``cls``: a single object filling most of the frame."""
    rng = _rng(spec.seed, _KIND_CLS, CLS_SPLITS.index(split), cls, index)
    s = spec.cls_image_size
    img = _background(rng, s, s)
    size = s * rng.uniform(0.6, 0.95)
    cx, cy = s * (0.5 + rng.uniform(-0.1, 0.1)), s * (0.5 + rng.uniform(-0.1, 0.1))
    obj = _sample_object(rng, cls, s, s, size, cx, cy, math.exp(rng.uniform(-0.25, 0.25)))
    _draw_object(rng, img, obj, _rasterize(obj["parts"], s, s))
    return _sensor_noise(rng, img)


def _overlap(a, b) -> float:
    """Intersection over the smaller of two (x0, y0, x1, y1) boxes."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    small = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / max(small, 1e-6)


def _mask_box(mask: np.ndarray):
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())  # inclusive, 0-based


def render_detection_image(
    spec: SyntheticSpec, split: str, index: int, kind: int = _KIND_DET, classes=None
):
    """One detection image and its annotations.

    Returns (RGB uint8 image, objects); each object is a dict with class index ``cls``, ``box``
    (0-based inclusive pixel indices x0, y0, x1, y1 of the visible mask), ``polygons``, ``area``,
    ``truncated``, ``difficult``, ``visible`` (visible fraction of its in-image area), ``mask``
    (the visible mask, bool h x w) and ``keypoints`` (K x 3: x, y in continuous pixel
    coordinates, pixel i spanning [i, i + 1), and COCO's visibility: 0 outside the image, 1
    under an object drawn above, 2 visible).

    ``kind`` (another seed word) and ``classes`` (indices into CLASS_NAMES, default the spec's
    detection classes) make the scenes of another set (the Cityscapes-style one) from the same
    drawing; the defaults are the VOC / COCO scenes.
    """
    rng = _rng(spec.seed, kind, VOC_SPLITS.index(split), 0, index)
    # all 10 by default; with novel_classes only those (the same draws: index i of the list)
    drawn = np.asarray(spec.detection_classes() if classes is None else classes)
    long_side = spec.det_image_size
    short_side = int(round(long_side * rng.uniform(0.75, 1.0)))
    h, w = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    img = _background(rng, h, w)

    n = int(rng.integers(spec.det_min_objects, spec.det_max_objects + 1))
    classes = drawn[rng.integers(0, len(drawn), n)]
    classes[-1] = drawn[index % len(drawn)]  # the top object is always kept: every class occurs
    placed = []
    for k in range(n):
        for _ in range(10):
            size = min(h, w) * math.exp(rng.uniform(math.log(DET_MIN_SIZE), math.log(DET_MAX_SIZE)))
            aspect = math.exp(rng.uniform(math.log(0.6), math.log(1.6)))
            cx, cy = w * rng.uniform(0.06, 0.94), h * rng.uniform(0.06, 0.94)
            obj = _sample_object(rng, int(classes[k]), h, w, size, cx, cy, aspect)
            mask, truncated = _object_masks(obj["parts"], h, w)
            if not mask.any():
                continue
            box = _mask_box(mask)
            # Keep occlusion partial: reject placements that mostly cover an earlier object's box.
            if k == n - 1 or all(_overlap(box, o["full_box"]) < 0.6 for o in placed):
                obj.update(mask=mask, truncated=truncated, full_box=box)
                placed.append(obj)
                break

    # Visibility from the top down; hidden objects are never drawn (see module docstring).
    covered = np.zeros((h, w), bool)
    kept = []
    for obj in reversed(placed):
        visible = obj["mask"] & ~covered
        npix = int(visible.sum())
        frac = npix / max(int(obj["mask"].sum()), 1)
        # the top object is unoccluded by construction; keep it even if tiny (class coverage)
        if obj is not placed[-1] and (npix < MIN_VISIBLE_PIXELS or frac < MIN_VISIBLE_FRACTION):
            continue
        polygons = mask_to_polygons(visible)
        if not polygons:
            continue
        obj.update(visible_mask=visible, visible=frac, polygons=polygons, area=float(npix))
        obj["keypoints"] = _keypoint_visibility(obj["keypoints"], covered)
        kept.append(obj)
        covered |= obj["mask"]
    kept.reverse()
    for obj in kept:
        _draw_object(rng, img, obj, obj["mask"])
    img = _sensor_noise(rng, img)
    objects = [
        {
            "cls": o["cls"],
            "box": _mask_box(o["visible_mask"]),
            "polygons": o["polygons"],
            "area": o["area"],
            "truncated": o["truncated"],
            "difficult": o["visible"] < DIFFICULT_VISIBLE_FRACTION,
            "visible": o["visible"],
            "mask": o["visible_mask"],
            "keypoints": o["keypoints"],
        }
        for o in kept
    ]
    return img, objects


def _keypoint_visibility(points: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """(K, 2) continuous coordinates -> (K, 3) with COCO's flag: 0 outside the image (COCO does
    not label those: x = y = 0), 1 on the mask of an object drawn above, 2 visible."""
    h, w = covered.shape
    out = np.zeros((len(points), 3))
    for i, (x, y) in enumerate(points):
        if 0 <= x < w and 0 <= y < h:
            out[i] = (x, y, 1 if covered[int(y), int(x)] else 2)
    return out
