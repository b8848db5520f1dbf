"""VisionJob on a tiny random Qwen2.5-VL: resize semantics, image sources and their policy, per-row
errors, batched == one row at a time, resume, processor fallback, CLI."""

import ast
import base64
import http.server
import importlib.util
import io
import json
import os
import struct
import subprocess
import sys
import threading
import types
import warnings
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from airflow_hfllm.config import GenerationParams, ModelSpec
from airflow_hfllm.vision.job import VisionJob
from airflow_hfllm.vision.images import ImageLoader
from airflow_hfllm.vision.resize import smart_resize
from airflow_hfllm.vision.sources import ImageError, ImageSource, SourceReader, parse_cell
from tests.conftest import prompt_text

SMALL = dict(min_pixels=8 * 28 * 28, max_pixels=48 * 28 * 28)  # 8..48 image tokens: fast on CPU
GREEDY = GenerationParams(max_new_tokens=16, do_sample=False)


@pytest.fixture(scope="session")
def tiny_vl(tmp_path_factory):
    from airflow_hfllm.testing.vision import make_tiny_vision_model

    return str(make_tiny_vision_model(tmp_path_factory.mktemp("models") / "tiny-vl"))


def make_image(k: int, mode: str = "RGB", size: tuple[int, int] | None = None) -> Image.Image:
    """Deterministic images of mixed sizes (30..700 px a side) and content."""
    rs = np.random.RandomState(k)
    w, h = size or (int(rs.randint(30, 700)), int(rs.randint(30, 700)))
    if k % 3 == 0:
        array = rs.randint(0, 256, (h, w, 3), dtype=np.uint8)
    else:
        yy, xx = np.mgrid[0:h, 0:w]
        array = np.stack([(xx * (k + 1)) % 256, (yy * (k + 3)) % 256, ((xx + yy) * k) % 256], -1).astype(np.uint8)
    image = Image.fromarray(array)
    if mode == "RGBA":
        image.putalpha(Image.fromarray(rs.randint(0, 256, (h, w), dtype=np.uint8)))
    elif mode != "RGB":
        image = image.convert(mode)
    return image


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels (and whose data is 16 zero bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def real_qwen_vl_utils() -> types.ModuleType:
    """The installed qwen_vl_utils' own image functions (``fetch_image``, ``smart_resize``, ``to_rgb``),
    executed from its source without the module-top torch/torchvision imports they do not use
    (torchvision cannot be installed on this CPU machine)."""
    origin = Path(importlib.util.find_spec("qwen_vl_utils").origin).parent / "vision_process.py"
    tree = ast.parse(origin.read_text())
    wanted = {"round_by_factor", "ceil_by_factor", "floor_by_factor", "smart_resize", "to_rgb", "fetch_image"}
    module = types.ModuleType("qwen_vl_utils")
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [getattr(node, "module", None) or "", *(a.name for a in node.names)]
            if any(n.split(".")[0] in ("torch", "torchvision") for n in names):
                continue
        elif not (isinstance(node, ast.Assign) or (isinstance(node, ast.FunctionDef) and node.name in wanted)):
            continue
        try:
            exec(compile(ast.Module([node], type_ignores=[]), str(origin), "exec"), module.__dict__)
        except NameError:  # module-level tables of the video readers left out above
            assert isinstance(node, ast.Assign)
    assert wanted <= set(vars(module)) and module.MAX_RATIO == 200
    return module


def job(tiny_vl, tmp_path, out="out", **kw):
    kw = {**SMALL, "params": GREEDY, "chunk_rows": 8, **kw}
    return VisionJob(input=str(tmp_path / "in.parquet"), output=str(tmp_path / out), model=ModelSpec(tiny_vl), **kw)


def read(path) -> pd.DataFrame:
    return pd.read_parquet(path).sort_values("id").set_index("id")


def write_manifest(tmp_path, rows: list[dict]) -> None:
    pd.DataFrame(rows).to_parquet(tmp_path / "in.parquet", index=False)


def good_rows(folder: Path, n: int, start: int = 0) -> list[dict]:
    """Rows with images of mixed sizes, modes and formats, one image each or two."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(start, start + n):
        mode, fmt = [("RGB", "PNG"), ("RGB", "JPEG"), ("RGBA", "PNG"), ("L", "PNG"), ("P", "PNG")][k % 5]
        paths = []
        for j in range(1 + (k % 4 == 3)):
            path = folder / f"img-{k}-{j}.{fmt.lower()}"
            path.write_bytes(encoded(make_image(10 * k + j, mode), fmt))
            paths.append(str(path) if k % 2 else f"file://{path}")
        rows.append({"id": k, "prompt": prompt_text(k)[:200], "image": paths})
    return rows


# -- resize semantics ------------------------------------------------------------------------------
def test_smart_resize_matches_qwen_vl_utils():
    qwen = real_qwen_vl_utils()
    sides = (1, 13, 28, 29, 55, 97, 224, 333, 419, 420, 448, 1000, 1280, 2048, 3001, 5000)
    sizes = [(h, w) for h in sides for w in sides]
    for min_pixels, max_pixels in ((224 * 28 * 28, 1280 * 28 * 28), (4 * 28 * 28, 16 * 28 * 28), (3136, 12845056)):
        for h, w in sizes:
            try:
                expected = qwen.smart_resize(h, w, 28, min_pixels, max_pixels)
            except ValueError:  # aspect ratio over 200: refused by both
                with pytest.raises(ImageError, match="aspect ratio"):
                    smart_resize(h, w, 28, min_pixels, max_pixels)
                continue
            if min(expected) < 28:  # qwen_vl_utils would hand the processor a 0-pixel side: a row error here
                with pytest.raises(ImageError, match="cannot be resized"):
                    smart_resize(h, w, 28, min_pixels, max_pixels)
                continue
            got = smart_resize(h, w, 28, min_pixels, max_pixels)
            assert got == expected, (h, w, min_pixels, max_pixels)
            assert got[0] % 28 == 0 and got[1] % 28 == 0
            if min(got) > 28:  # (qwen_vl_utils keeps a side of at least 28 even when that breaks the bounds)
                assert min_pixels <= got[0] * got[1] <= max_pixels, (h, w, got)


def test_pil_path_gives_the_same_pixels_as_qwen_vl_utils(monkeypatch):
    pil = ImageLoader(**SMALL, backend="pil")
    assert "PIL implementation" in pil.describe()
    monkeypatch.setitem(sys.modules, "qwen_vl_utils", real_qwen_vl_utils())
    qwen = ImageLoader(**SMALL)  # auto: qwen_vl_utils imports now
    assert qwen.backend == "qwen-vl-utils" and "qwen_vl_utils.fetch_image" in qwen.describe()
    assert pil.fingerprint() == qwen.fingerprint()
    for k, mode in enumerate(["RGB", "RGBA", "L", "P", "LA", "1", "CMYK", "RGB"]):
        data = encoded(make_image(k, mode if mode != "CMYK" else "RGB"), "JPEG" if mode == "CMYK" else "PNG")
        if mode == "CMYK":
            data = encoded(Image.open(io.BytesIO(data)).convert("CMYK"), "JPEG")
        probed = pil.probe(ImageSource("bytes", data))
        a, b = pil.load(probed), qwen.load(probed)
        assert a.mode == b.mode == "RGB" and a.size == b.size == (probed.target_width, probed.target_height)
        assert a.tobytes() == b.tobytes(), mode
        assert probed.tokens == (a.size[0] // 28) * (a.size[1] // 28)


# -- image sources and their policy ------------------------------------------------------------------
def test_sources_and_scheme_policy(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(encoded(make_image(1, size=(90, 60))))
    data = path.read_bytes()
    reader = SourceReader()
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    import fsspec

    fsspec.filesystem("memory").pipe("/vision-test/a.png", data)
    for ref in (str(path), f"file://{path}", uri, data, {"bytes": data, "path": None},
                {"bytes": None, "path": str(path)}, "memory://vision-test/a.png"):
        (source,) = parse_cell(ref)
        assert reader.read(source) == data
    assert [s.kind for s in parse_cell([str(path), data])] == ["local", "bytes"]

    refused = {
        "http://example.com/a.png": "http:// images are not allowed",
        "https://example.com/a.png": "https:// images are not allowed",
        "ftp://example.com/a.png": "scheme 'ftp' is not allowed",
        "sftp://host/a.png": "scheme 'sftp' is not allowed",
        "ssh://host/a.png": "scheme 'ssh' is not allowed",
    }
    for ref, message in refused.items():
        with pytest.raises(ImageError, match=message):
            reader.check(parse_cell(ref)[0])
    for cell, message in ((None, "image is null"), ([], "image list is empty"), (3, "is a int"), ("  ", "empty"),
                          ([str(path), None], "image 2 of 2 is null"),
                          ("data:text/plain;base64,aGk=", "not data:image")):
        with pytest.raises(ImageError, match=message):
            parse_cell(cell)


def test_http_only_when_allowed_and_never_redirected_to_a_file(tmp_path):
    data = encoded(make_image(2, size=(64, 48)))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/redirect"):
                self.send_response(302)
                self.send_header("Location", f"file://{tmp_path}/secret.png" if self.path.endswith("file")
                                 else "ftp://127.0.0.1/secret.png")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        with pytest.raises(ImageError, match="not allowed"):
            ImageLoader(**SMALL).probe(parse_cell(url + "/a.png")[0])
        allowed = ImageLoader(**SMALL, allow_http=True)
        assert allowed.probe(parse_cell(url + "/a.png")[0]).data == data
        with pytest.raises(ImageError, match="redirect to another scheme refused"):
            allowed.reader.read(parse_cell(url + "/redirect-ftp")[0])
        with pytest.raises(ImageError, match="cannot read the image"):  # urllib refuses http -> file itself
            allowed.reader.read(parse_cell(url + "/redirect-file")[0])
    finally:
        server.shutdown()


def test_decompression_bombs_are_refused_from_the_header(tmp_path):
    loader = ImageLoader(**SMALL)
    limit = Image.MAX_IMAGE_PIXELS
    filters = list(warnings.filters)
    # Header-only files: nothing could be decoded, so the refusal can only come from the size check.
    for width, height in ((100_000, 100_000), (10_000, 9_000)):  # over twice the limit (PIL error); over it (warning)
        assert width * height > limit
        with pytest.raises(ImageError, match="decompression-bomb limit"):
            loader.probe(ImageSource("bytes", png_header(width, height)))
    # A real, decodable image just over the limit (1-bit, so it stays small).
    side = int(limit**0.5) + 10
    with pytest.raises(ImageError, match="decompression-bomb limit"):
        loader.probe(ImageSource("bytes", encoded(Image.new("1", (side, side)))))
    assert Image.MAX_IMAGE_PIXELS == limit and warnings.filters == filters  # nothing changed globally


# -- the job ---------------------------------------------------------------------------------------
def test_bad_images_are_row_errors_and_other_rows_are_unharmed(tiny_vl, tmp_path):
    images = tmp_path / "images"
    rows = good_rows(images, 10)
    truncated = images / "truncated.png"
    truncated.write_bytes(encoded(make_image(78, size=(300, 200)))[:4000])  # random pixels: ~180 kB in full
    (images / "notes.txt").write_text("not an image at all")
    bomb = images / "bomb.png"
    bomb.write_bytes(encoded(Image.new("1", (int(Image.MAX_IMAGE_PIXELS**0.5) + 10,) * 2)))
    (images / "folder.png").mkdir()
    bad = {
        100: ([str(images / "missing.png")], "image not found"),
        101: ([str(truncated)], "corrupt image data (OSError: image file is truncated"),
        102: ([str(images / "notes.txt")], "not an image (unrecognised format)"),
        103: ([str(bomb)], "over PIL's decompression-bomb limit"),
        104: (["data:image/png;base64," + base64.b64encode(png_header(100_000, 100_000)).decode()],
              "over PIL's decompression-bomb limit"),
        105: (["http://127.0.0.1:9/a.png"], "http:// images are not allowed (allow_http_images=False)"),
        106: (["ftp://example.com/a.png"], "URL scheme 'ftp' is not allowed"),
        107: (None, "image is null"),
        108: ([], "image list is empty"),
        109: ([rows[0]["image"][0], str(images / "missing.png")], "image 2 of 2: image not found"),
        110: ([str(images / "folder.png")], "image path is a directory"),
        111: (["data:image/png;base64," + base64.b64encode(b"\x89PNG garbage").decode()], "not an image"),
    }
    manifest = rows[:5] + [{"id": i, "prompt": f"bad row {i}", "image": img} for i, (img, _) in bad.items()] + rows[5:]
    write_manifest(tmp_path, manifest)
    result = job(tiny_vl, tmp_path, max_error_rate=0.6).run()
    out = read(tmp_path / "out")
    assert sorted(out.index) == sorted(r["id"] for r in manifest)
    for i, (_, message) in bad.items():
        assert out.loc[i, "finish_reason"] == "error" and message in out.loc[i, "error"], (i, out.loc[i, "error"])
        assert pd.isna(out.loc[i, "output"])
        assert str(images) not in out.loc[i, "error"]  # errors name the problem, not the path
    good = out.drop(index=list(bad))
    assert good.error.isna().all() and good.output.notna().all() and (good.output_tokens > 0).all()
    assert result["counts"]["errors"] == len(bad) and result["counts"]["generated"] == 10
    assert result["vision"]["image_backend"] == "pil" and "built from" in result["vision"]["processor"]

    # The same good rows alone give the same outputs: the bad ones changed nothing.
    write_manifest(tmp_path, rows)
    job(tiny_vl, tmp_path, out="clean").run()
    clean = read(tmp_path / "clean")
    pd.testing.assert_series_equal(good.output, clean.output)
    pd.testing.assert_series_equal(good.prompt_tokens, clean.prompt_tokens)


def test_batched_generation_equals_one_row_at_a_time(tiny_vl, tmp_path, monkeypatch):
    write_manifest(tmp_path, good_rows(tmp_path / "images", 16))
    from airflow_hfllm.vision.generator import VisionGenerator

    batch_sizes = []
    original = VisionGenerator._generate

    def recording(self, batch, requests):
        batch_sizes.append(len(batch))
        return original(self, batch, requests)

    monkeypatch.setattr(VisionGenerator, "_generate", recording)
    job(tiny_vl, tmp_path, out="batched", chunk_rows=16).run()
    assert max(batch_sizes) == 16
    batch_sizes.clear()
    job(tiny_vl, tmp_path, out="single", chunk_rows=16, batch_size=1).run()
    assert set(batch_sizes) == {1} and len(batch_sizes) == 16

    batched, single = read(tmp_path / "batched"), read(tmp_path / "single")
    # Not vacuous: replies are long and all different (the image and the prompt both matter).
    assert (batched.output_tokens >= 8).all() and batched.output.nunique() == 16
    assert batched.output.str.split().str.len().min() >= 5
    assert (batched.prompt_tokens > 20).all() and batched.prompt_tokens.nunique() > 8  # mixed image sizes
    pd.testing.assert_series_equal(batched.output, single.output)
    pd.testing.assert_series_equal(batched.finish_reason, single.finish_reason)


def test_fast_engine_equals_batched_generate(tiny_vl, tmp_path):
    """The vision fast engine (prefill with images and multimodal rope, then decode from the static KV
    cache at rope position = KV index + offset) gives batched generate()'s greedy outputs, with rows
    joining and leaving 4 slots, packed vision attention, and bad images ending as error rows."""
    from airflow_hfllm.vision.fast import VisionFastEngine

    rows = good_rows(tmp_path / "images", 14)
    rows[6]["image"] = [str(tmp_path / "images" / "missing.png")]
    (tmp_path / "images" / "broken.png").write_bytes(encoded(make_image(78, size=(300, 200)))[:4000])
    rows[9]["image"] = [str(tmp_path / "images" / "broken.png")]  # fails only when decoded, in a thread
    write_manifest(tmp_path, rows)
    engines = []
    original = VisionFastEngine.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        engines.append(self)

    VisionFastEngine.__init__ = recording
    try:
        fast = job(tiny_vl, tmp_path, out="fast", engine="fast", batch_size=4, max_error_rate=0.5).run()
    finally:
        VisionFastEngine.__init__ = original
    job(tiny_vl, tmp_path, out="batched", engine="batched", max_error_rate=0.5).run()
    assert fast["engine"] == "fast" and engines[0].packed_attention_modules > 0
    assert engines[0].steps > 16  # several replays: rows came and went through 4 slots
    assert (engines[0].rope_offset != 0).any()  # images take fewer rope positions than tokens
    a, b = read(tmp_path / "fast"), read(tmp_path / "batched")
    assert a.loc[6, "error"] == "image not found" and "corrupt image data" in a.loc[9, "error"]
    good = a.drop(index=[6, 9])
    assert good.output.nunique() == 12 and (good.output_tokens >= 8).all()
    assert good.prompt_tokens.nunique() > 6  # mixed image sizes
    for column in ("output", "finish_reason", "output_tokens", "prompt_tokens", "error"):
        pd.testing.assert_series_equal(a[column], b[column])


def test_packed_vision_attention_equals_the_models_own(tiny_vl):
    """The vision tower with attention packed by length gives the stock per-window loop's features."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    from airflow_hfllm.vision.attention import pack_vision_attention

    model = AutoModelForImageTextToText.from_pretrained(tiny_vl, dtype=torch.float32).eval()
    processor = AutoImageProcessor.from_pretrained(tiny_vl)
    images = [make_image(k, size=(28 * (3 + k), 28 * (9 - k))) for k in range(5)]  # windows of many lengths
    inputs = processor(images=images, return_tensors="pt")

    def features():
        with torch.inference_mode():
            out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        return torch.cat(list(getattr(out, "pooler_output", out)))

    stock = features()
    assert pack_vision_attention(model) == model.config.vision_config.depth
    packed = features()
    assert stock.shape[0] == int((inputs["image_grid_thw"].prod(-1) // 4).sum())
    torch.testing.assert_close(packed, stock, rtol=1e-4, atol=1e-4)


def test_a_row_the_processor_rejects_is_an_error_row(tiny_vl, tmp_path, monkeypatch):
    from airflow_hfllm.vision.generator import VisionGenerator

    rows = good_rows(tmp_path / "images", 6)
    rows[3]["prompt"] = "an image the processor rejects"
    write_manifest(tmp_path, rows)
    original = VisionGenerator._inputs

    def rejecting(self, batch, requests):  # fault injection: the processor raises on one row's input
        if any("processor rejects" in requests[i].text for i in batch):
            raise ValueError("unsupported image layout")
        return original(self, batch, requests)

    monkeypatch.setattr(VisionGenerator, "_inputs", rejecting)
    job(tiny_vl, tmp_path, max_error_rate=0.5).run()
    out = read(tmp_path / "out")
    assert out.loc[3, "error"] == "image processor failed (ValueError: unsupported image layout)"
    assert out.drop(index=3).output.notna().all() and out.drop(index=3).error.isna().all()


def test_prompt_tokens_match_the_processor(tiny_vl, tmp_path):
    from airflow_hfllm.vision.processor import get_processor
    from airflow_hfllm.vision.requests import build_request

    processor = get_processor(ModelSpec(tiny_vl, task="vision"))
    loader = ImageLoader(**SMALL)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is this?"}]
    for k in range(4):
        probed = [loader.probe(ImageSource("bytes", encoded(make_image(k + j)))) for j in range(1 + k % 2)]
        request = build_request(processor, messages, probed, 8)
        inputs = processor.processor(text=[request.text], images=[loader.load(p) for p in probed], return_tensors="pt",
                                     size={"shortest_edge": loader.min_pixels, "longest_edge": loader.max_pixels})
        assert inputs["input_ids"][0].tolist() == request.input_ids
        assert [int(t * h * w) // 4 for t, h, w in inputs["image_grid_thw"].tolist()] == [p.tokens for p in probed]


def test_binary_column_resume_and_resize_in_fingerprint(tiny_vl, tmp_path):
    rows = [{"id": f"r{k}", "prompt": prompt_text(k)[:80], "image": encoded(make_image(k), "JPEG" if k % 2 else "PNG")}
            for k in range(6)]
    rows[3]["image"] = b"\x00\x01 not an image"
    write_manifest(tmp_path, rows)
    first = job(tiny_vl, tmp_path, chunk_rows=3, max_error_rate=0.5).run()
    out = read(tmp_path / "out")
    assert out.loc["r3", "error"] == "not an image (unrecognised format)" and out.drop(index="r3").output.notna().all()

    parts = sorted((tmp_path / "out").glob("part-*.parquet"))
    stamps = [p.stat().st_mtime_ns for p in parts]
    again = job(tiny_vl, tmp_path, chunk_rows=3, max_error_rate=0.5).run()
    assert [p.stat().st_mtime_ns for p in parts] == stamps and again["generate_seconds"] == 0
    assert again["fingerprint"] == first["fingerprint"]

    resized = job(tiny_vl, tmp_path, chunk_rows=3, max_error_rate=0.5, max_pixels=16 * 28 * 28).run()
    assert resized["fingerprint"] != first["fingerprint"] and len(resized["attempts"]) == 1
    assert (read(tmp_path / "out").prompt_tokens < out.prompt_tokens).any()


def test_up_front_errors(tiny_vl, tmp_path):
    from airflow_hfllm.io.dataset import InputError

    pd.DataFrame({"id": [1], "prompt": ["x"], "image": [1.5]}).to_parquet(tmp_path / "in.parquet")
    with pytest.raises(InputError, match="column 'image' is double, expected"):
        job(tiny_vl, tmp_path).run()
    pd.DataFrame({"id": [1], "prompt": ["x"]}).to_parquet(tmp_path / "in.parquet")
    with pytest.raises(InputError, match="missing column 'image'"):
        job(tiny_vl, tmp_path).run()
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        job(tiny_vl, tmp_path, min_pixels=10, max_pixels=5)


def test_processor_is_built_from_its_parts_when_autoprocessor_cannot(tiny_vl, monkeypatch):
    import transformers

    from airflow_hfllm.vision.processor import load_processor

    spec = ModelSpec(tiny_vl, task="vision")
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(ImportError, match="Torchvision"):  # the fact docs/design.md records, on this machine
            transformers.AutoProcessor.from_pretrained(tiny_vl)
    built = load_processor(spec)
    assert "built from image processor + tokenizer" in built.how and built.factor == 28
    assert built.tokenizer.padding_side == "left"
    assert built.image_token_id == built.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    # Some versions hand back the tokenizer alone instead of raising: detected the same way.
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained",
                        lambda name, **kw: transformers.AutoTokenizer.from_pretrained(name, **kw))
    fallback = load_processor(spec)
    assert "returned a" in fallback.how and "without an image processor" in fallback.how
    assert fallback.image_processor is not None


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="AutoProcessor needs torchvision")
def test_tiny_processor_loads_with_autoprocessor(tiny_vl):
    import transformers

    processor = transformers.AutoProcessor.from_pretrained(tiny_vl)
    assert processor.image_processor is not None and processor.tokenizer is not None


def test_tiny_vision_model_files(tiny_vl):
    import transformers

    config = transformers.AutoConfig.from_pretrained(tiny_vl)
    tok = transformers.AutoTokenizer.from_pretrained(tiny_vl)
    for token in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"):
        assert len(tok.encode(token, add_special_tokens=False)) == 1
    assert config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    text = config.text_config
    assert sum(text.rope_parameters["mrope_section"]) * 2 == text.hidden_size // text.num_attention_heads
    assert type(transformers.AutoImageProcessor.from_pretrained(tiny_vl)).__name__.startswith("Qwen2VLImageProcessor")
    model = transformers.AutoModelForImageTextToText.from_pretrained(tiny_vl)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"


def test_cli_vision_prints_manifest_and_logs_no_text_or_paths(tiny_vl, tmp_path):
    rows = good_rows(tmp_path / "secret-images", 4)
    rows[1]["prompt"] = "a very private question about the photo"
    rows[2]["image"] = [str(tmp_path / "secret-images" / "gone.png")]
    write_manifest(tmp_path, rows)
    done = subprocess.run([sys.executable, "-m", "airflow_hfllm.cli", "vision", "--model", tiny_vl,
                           "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"),
                           "--max-new-tokens", "6", "--min-pixels", str(SMALL["min_pixels"]),
                           "--max-pixels", str(SMALL["max_pixels"]), "--max-error-rate", "0.5", "--engine", "fast"],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads(done.stdout)
    assert manifest["counts"]["rows"] == 4 and manifest["counts"]["errors"] == 1
    assert manifest["engine"] == "fast" and manifest["engine_stats"]["packed_attention_modules"] > 0
    assert manifest["model"]["task"] == "vision" and manifest["vision"]["min_pixels"] == SMALL["min_pixels"]
    assert "PIL implementation" in done.stderr and "built from image processor + tokenizer" in done.stderr
    assert "private question" not in done.stderr and "secret-images" not in done.stderr


@pytest.mark.timeout(60)
def test_a_fifo_or_device_named_as_an_image_is_a_row_error_not_a_hang(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # nobody ever writes to it: a blocking open or read would wait forever
    reader = SourceReader()
    for ref in (str(fifo), f"file://{fifo}", "/dev/zero"):
        with pytest.raises(ImageError, match="not a regular file"):
            reader.read(parse_cell(ref)[0])
