"""Qwen3-VL and Qwen3-VL-MoE on the vision fast engine, as tiny random models loaded through from_pretrained:
16-pixel patches (one image token per 32x32 pixels), interleaved multimodal rope, deepstack features added
after the first decoder layers. Greedy tokens equal transformers generate() exactly (CPU, fp32), with rows
joining and leaving slots; without the deepstack features they do not."""

import sys

import pandas as pd
import pytest

from airflow_hfllm.config import GenerationParams, ModelSpec
from airflow_hfllm.engine.kv_cache import BlockPool
from airflow_hfllm.vision.images import ImageLoader
from airflow_hfllm.vision.sources import ImageSource
from tests.conftest import prompt_text
from tests.unit.test_vision import encoded, good_rows, make_image, read, real_qwen_vl_utils, write_manifest

SMALL = dict(min_pixels=8 * 32 * 32, max_pixels=48 * 32 * 32)  # 8..48 image tokens of 32x32 pixels
ROWS, NEW = 20, 40
FAMILIES = ("qwen3_vl", "qwen3_vl_moe")


@pytest.fixture(scope="module")
def qwen3_vl(tmp_path_factory):
    from airflow_hfllm.testing.vision import make_tiny_vision_model

    root, built = tmp_path_factory.mktemp("qwen3-vl"), {}

    def get(family: str = "qwen3_vl") -> str:
        if family not in built:
            built[family] = str(make_tiny_vision_model(root / family, family=family))
        return built[family]

    return get


def setup(model: str, dtype: str = "auto"):
    """(loaded model, processor, image loader at the processor's factor, params, requests): ROWS rows of
    one image or two, of mixed sizes and aspect ratios."""
    from airflow_hfllm.vision.processor import get_processor, get_vision_model
    from airflow_hfllm.vision.requests import build_request

    loaded = get_vision_model(ModelSpec(model, dtype=dtype))
    processor = get_processor(ModelSpec(model, task="vision"))
    loader = ImageLoader(**SMALL, factor=processor.factor, backend="pil")
    requests = []
    for i in range(ROWS):
        images = [loader.probe(ImageSource("bytes", encoded(make_image(40 + 3 * i + j)))) for j in range(1 + (i % 5 == 4))]
        requests.append(build_request(processor, [{"role": "user", "content": prompt_text(i)}], images, NEW))
    return loaded, processor, loader, GenerationParams(max_new_tokens=NEW, do_sample=False), requests


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_engine_equals_generate(qwen3_vl, family):
    from airflow_hfllm.engine.decoder import unsupported_reason
    from airflow_hfllm.vision.fast import VisionFastEngine
    from airflow_hfllm.vision.generator import VisionGenerator

    loaded, processor, loader, params, requests = setup(qwen3_vl(family))
    assert loaded.model.config.model_type == family and unsupported_reason(loaded, vision=True) is None
    assert processor.factor == 32 and loader.factor == 32
    assert len({len(r.input_ids) for r in requests}) > ROWS // 2  # images of many sizes
    reference = VisionGenerator(loaded, params, processor, loader, max_batch_size=1).generate(requests)
    assert sum(c.output_tokens >= 24 for c in reference) >= 0.8 * ROWS
    assert len({c.text for c in reference}) >= 0.9 * ROWS

    engine = VisionFastEngine(loaded, params, processor, loader, slots=5, steps_per_sync=3)  # rows join and leave
    fast = engine.generate(requests)
    assert engine.packed_attention_modules == loaded.model.config.vision_config.depth
    assert (engine.rope_offset < 0).any()  # images take fewer rope positions than tokens
    assert [c.text for c in fast] == [c.text for c in reference]
    assert [c.finish_reason for c in fast] == [c.finish_reason for c in reference]
    assert [c.output_tokens for c in fast] == [c.output_tokens for c in reference]
    # a paged cache of two rows' blocks in 5 slots: a row's blocks counted from its exact length, once its
    # images are ready and expanded
    blocks = 2 * BlockPool.need(max(len(r.input_ids) + r.max_new_tokens for r in requests)) + 1  # expanded
    paged = VisionFastEngine(loaded, params, processor, loader, slots=5, steps_per_sync=3, paged=True,
                             kv_blocks=blocks)
    fresh = setup(qwen3_vl(family))[-1]  # placeholders not yet expanded
    assert [c.text for c in paged.generate(fresh)] == [c.text for c in reference] and paged.table is not None


def test_deepstack_features_matter(qwen3_vl):
    """The same engine with the deepstack features left out answers otherwise: the equality above needs them."""
    from airflow_hfllm.vision.fast import VisionFastEngine
    from airflow_hfllm.vision.generator import VisionGenerator

    loaded, processor, loader, params, requests = setup(qwen3_vl())
    dropped = []

    class WithoutDeepstack(VisionFastEngine):
        def _inputs(self, group, skip=0):
            *inputs, deepstack = super()._inputs(group, skip)
            mask, features = deepstack
            assert len(features) == 2 and all(f.shape[0] == int(mask.sum()) for f in features)
            dropped.append(len(group))
            return (*inputs, None)

    reference = VisionGenerator(loaded, params, processor, loader, max_batch_size=8).generate(requests)
    without = WithoutDeepstack(loaded, params, processor, loader, slots=5, steps_per_sync=3).generate(requests)
    assert sum(dropped) == ROWS
    differ = sum(a.text != b.text for a, b in zip(reference, without))
    assert differ >= 0.8 * ROWS, differ


def test_packed_vision_attention_equals_the_models_own(qwen3_vl):
    """Qwen3-VL's tower attends within each image: packed by length, its embeddings and deepstack
    features are the stock loop's."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    from airflow_hfllm.vision.attention import pack_vision_attention

    model = AutoModelForImageTextToText.from_pretrained(qwen3_vl(), dtype=torch.float32).eval()
    processor = AutoImageProcessor.from_pretrained(qwen3_vl())
    images = [make_image(k, size=(32 * (3 + k), 32 * (7 - k))) for k in range(4)]
    inputs = processor(images=images, return_tensors="pt")

    def features():
        with torch.inference_mode():
            out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        return [torch.cat(list(out.pooler_output))] + [torch.cat(list(f)) for f in out.deepstack_features]

    stock = features()
    assert pack_vision_attention(model) == model.config.vision_config.depth
    packed = features()
    assert len(stock) == 3 and stock[0].shape[0] == int((inputs["image_grid_thw"].prod(-1) // 4).sum())
    for a, b in zip(packed, stock):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_pixels_are_counted_in_32_pixel_squares(qwen3_vl, monkeypatch):
    """min_pixels/max_pixels bound the resized image, sides multiples of 32, one token per 32x32 square:
    the probed count is the processor's (size={"shortest_edge": min_pixels, "longest_edge": max_pixels}),
    and qwen_vl_utils (image_patch_size=16) resizes to the same pixels as the PIL path."""
    from airflow_hfllm.vision.processor import get_processor

    processor = get_processor(ModelSpec(qwen3_vl(), task="vision"))
    assert processor.factor == 32 and processor.image_processor.patch_size == 16
    pil = ImageLoader(**SMALL, factor=32, backend="pil")
    monkeypatch.setitem(sys.modules, "qwen_vl_utils", real_qwen_vl_utils())
    qwen = ImageLoader(**SMALL, factor=32)
    assert qwen.backend == "qwen-vl-utils"
    for k in range(8):
        probed = pil.probe(ImageSource("bytes", encoded(make_image(k))))
        image = pil.load(probed)
        assert image.tobytes() == qwen.load(probed).tobytes()
        width, height = image.size
        assert width % 32 == 0 and height % 32 == 0 and SMALL["min_pixels"] <= width * height <= SMALL["max_pixels"]
        out = processor.image_processor(images=[image], return_tensors="pt",
                                        size={"shortest_edge": pil.min_pixels, "longest_edge": pil.max_pixels})
        t, h, w = out["image_grid_thw"][0].tolist()
        assert (t, h * 16, w * 16) == (1, height, width)
        assert probed.tokens == (width // 32) * (height // 32) == t * h * w // 4


def test_job_runs_qwen3_vl_on_the_fast_engine(qwen3_vl, tmp_path):
    """A VisionJob end to end: the fast engine's outputs are batched generate()'s, a missing image is that
    row's error, and the fingerprint records the 32-pixel factor."""
    from airflow_hfllm.vision.job import VisionJob

    rows = good_rows(tmp_path / "images", 10)
    rows[4]["image"] = [str(tmp_path / "images" / "missing.png")]
    write_manifest(tmp_path, rows)

    def run(engine):
        return VisionJob(input=str(tmp_path / "in.parquet"), output=str(tmp_path / engine), model=ModelSpec(qwen3_vl()),
                         params=GenerationParams(max_new_tokens=16, do_sample=False), chunk_rows=4, batch_size=3,
                         max_error_rate=0.5, engine=engine, **SMALL).run()

    fast, batched = run("fast"), run("batched")
    assert fast["engine"] == "fast" and batched["engine"] == "batched-generate"
    assert fast["vision"]["factor"] == 32 and fast["engine_stats"]["packed_attention_modules"] == 3
    a, b = read(tmp_path / "fast"), read(tmp_path / "batched")
    assert a.loc[4, "error"] == "image not found"
    good = a.drop(index=4)
    assert good.output.nunique() == 9 and (good.output_tokens >= 8).all() and good.prompt_tokens.nunique() > 5
    for column in ("output", "finish_reason", "output_tokens", "prompt_tokens", "error"):
        pd.testing.assert_series_equal(a[column], b[column])
