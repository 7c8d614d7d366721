"""The image workload: chat requests of real text and 1-4 generated images, some repeated.

Plan (pure, seeded): request ``i`` carries ``k_i`` images, uniform in ``[min_images,
max_images]``. Each image occurrence is, with probability ``repeat_share``, a reuse of an
image already used by an earlier request (picked with a Zipf skew over the order in which
images first appeared: ``P(rank r) ~ 1 / (r + 1) ** zipf_s``, so early images stay popular),
else a new image. A request never holds the same image twice. The realized repeat share
(``ImagePlan.repeat_share``) is the best embedding-cache hit rate any deployment can reach:
every first occurrence must be encoded.

Images (``make_image``, numpy + Pillow, seeded): smooth colour fields with a few flat
shapes, sizes from ``IMAGE_SIZES`` (0.5-2 aspect ratios, 256-1024 px), JPEG (with mild
noise) or PNG. ``variant`` changes the pixels of every image but not the plan, so one plan
can run at several rates against one cluster with its caches cold at each start.

Text: a real-text passage per request (``PromptBuilder`` windows of the corpus, decoded)
followed by a question about the images.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np

from scission.bench.prompts import PromptBuilder, Tokenizer, splitmix64
from scission.bench.workload import ImagePart, LengthConfig, Workload, WorkloadRequest

logger = logging.getLogger(__name__)

# (width, height): portrait, square and landscape, small to large.
IMAGE_SIZES = ((256, 256), (320, 480), (480, 320), (512, 384), (384, 512), (640, 480),
               (800, 400), (400, 800), (768, 768), (1024, 576))
QUESTIONS = ("What do these images show?", "Describe the picture in one sentence.",
             "How do the images relate to the passage above?", "Which colours stand out?",
             "Compare the images.", "What is in the foreground?")
_MIME = {"JPEG": "image/jpeg", "PNG": "image/png"}


@dataclass(frozen=True)
class ImageWorkloadConfig:
    num_requests: int = 24
    min_images: int = 1
    max_images: int = 4
    repeat_share: float = 0.4  # probability that an image occurrence reuses an earlier image
    zipf_s: float = 1.0  # skew of the reuse over images (0 = uniform)
    png_share: float = 0.3  # of distinct images; the rest are JPEG
    text_len: LengthConfig = LengthConfig(48)  # passage tokens (before decoding to text)
    output_len: LengthConfig = LengthConfig(32)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.min_images <= self.max_images or self.num_requests < 1:
            raise ValueError(f"need 1 <= min_images <= max_images and requests >= 1: {self}")
        if not 0 <= self.repeat_share < 1 or self.zipf_s < 0 or not 0 <= self.png_share <= 1:
            raise ValueError("need 0 <= repeat_share < 1, zipf_s >= 0, png_share in [0, 1]")


@dataclass(frozen=True)
class ImageSpec:
    """One distinct image: its pixels are a function of (index, seed, variant)."""

    index: int
    width: int
    height: int
    fmt: str  # "JPEG" | "PNG"


@dataclass(frozen=True)
class ImagePlan:
    """Which images each request carries (indices into ``images``)."""

    images: tuple[ImageSpec, ...]
    requests: tuple[tuple[int, ...], ...]

    @property
    def num_occurrences(self) -> int:
        return sum(len(r) for r in self.requests)

    @property
    def repeat_share(self) -> float:
        """Occurrences that are not an image's first: the best possible cache hit rate."""
        return 1 - len(self.images) / self.num_occurrences


def _pick_reuse(rng: np.random.Generator, num_seen: int, exclude: set[int],
                zipf_s: float) -> int | None:
    candidates = np.array([i for i in range(num_seen) if i not in exclude], dtype=np.int64)
    if len(candidates) == 0:
        return None
    weights = 1.0 / (candidates + 1.0) ** zipf_s
    return int(rng.choice(candidates, p=weights / weights.sum()))


def plan_images(cfg: ImageWorkloadConfig) -> ImagePlan:
    """The seeded plan of distinct images and each request's images (module docstring)."""
    rng = np.random.default_rng(cfg.seed)
    specs: list[ImageSpec] = []
    requests: list[tuple[int, ...]] = []
    for _ in range(cfg.num_requests):
        num_seen = len(specs)  # images of earlier requests: the only ones a reuse may pick
        chosen: list[int] = []
        for _ in range(int(rng.integers(cfg.min_images, cfg.max_images, endpoint=True))):
            reuse = None
            if rng.random() < cfg.repeat_share:
                reuse = _pick_reuse(rng, num_seen, set(chosen), cfg.zipf_s)
            if reuse is None:
                width, height = IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
                fmt = "PNG" if rng.random() < cfg.png_share else "JPEG"
                specs.append(ImageSpec(len(specs), width, height, fmt))
                reuse = len(specs) - 1
            chosen.append(reuse)
        requests.append(tuple(chosen))
    return ImagePlan(tuple(specs), tuple(requests))


def make_image(spec: ImageSpec, seed: int = 0, variant: int = 0) -> bytes:
    """Encoded bytes of ``spec``: a smooth colour field plus a few flat rectangles (JPEG:
    with mild noise), deterministic in (spec, seed, variant)."""
    from PIL import Image

    key = splitmix64((seed << 40) ^ (variant << 20) ^ spec.index)
    rng = np.random.default_rng(key)
    h, w = spec.height, spec.width
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / max(h, w)
    freq, phase = rng.uniform(1, 8, size=(3, 2)), rng.uniform(0, 2 * np.pi, size=3)
    pixels = np.stack([127.5 + 127.5 * np.sin(freq[c, 0] * xx * 2 * np.pi
                                               + freq[c, 1] * yy * 2 * np.pi + phase[c])
                       for c in range(3)], axis=-1)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = int(rng.integers(w)), int(rng.integers(h))
        x1, y1 = x0 + int(rng.integers(w // 8, w // 2)), y0 + int(rng.integers(h // 8, h // 2))
        pixels[y0:y1, x0:x1] = rng.uniform(0, 255, size=3)
    if spec.fmt == "JPEG":
        pixels += rng.normal(0, 6, size=pixels.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format=spec.fmt)
    return buf.getvalue()


def build_image_workload(cfg: ImageWorkloadConfig, plan: ImagePlan, builder: PromptBuilder,
                         tokenizer: Tokenizer, variant: int = 0,
                         request_id_prefix: str = "img") -> Workload:
    """The chat requests of ``plan``: passage + question text, then the images' bytes
    (``variant`` of their pixels); output lengths from ``cfg.output_len``."""
    rng = np.random.default_rng(cfg.seed)
    text_lens = cfg.text_len.sample(cfg.num_requests, rng)
    output_lens = cfg.output_len.sample(cfg.num_requests, rng)
    images = [ImagePart(make_image(s, cfg.seed, variant), _MIME[s.fmt]) for s in plan.images]
    requests = []
    for i, chosen in enumerate(plan.requests):
        passage = tokenizer.decode(builder.prompt(text_lens[i], i)).strip()
        text = f"{passage}\n{QUESTIONS[i % len(QUESTIONS)]}"
        requests.append(WorkloadRequest(
            request_id=f"{request_id_prefix}-{i}", prompt_token_ids=(),
            output_tokens=output_lens[i], arrival_s=0.0, text=text,
            images=tuple(images[k] for k in chosen)))
    logger.info("image workload: %d requests, %d images (%d distinct, %.0f%% repeats), "
                "%.1f MiB of image bytes", len(requests), plan.num_occurrences,
                len(plan.images), 100 * plan.repeat_share,
                sum(len(im.data) for im in images) / 2**20)
    return Workload(name="images", requests=tuple(requests))
