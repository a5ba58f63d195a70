"""The Tinker backend's fallbacks, without a Tinker server (`make test-tinker` runs them on one).

Adapter download from a server that has no external weights: the sampler checkpoint's
archive, fetched from a real HTTP server on 127.0.0.1 that answers as SkyRL's Tinker API
server does (the archive route redirects to a download route; 425 while the checkpoint is
still being written), holding a real PEFT adapter trained on nothing but made by peft on a
tiny model. And per-row sampling failures: the SDK's real exception and response types
in real futures, as its SamplingClient hands them back.
"""

import concurrent.futures
import http.server
import io
import tarfile
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny import save_tiny, tiny_tokenizer
from tinker import types
from transformers import AutoModelForCausalLM

from promptdistill.backends.tinker import TinkerSampler, extract_adapter, fetch_archive, install_adapter
from promptdistill.models import ModelError, check_adapter

KEY = "tml-test-secret-key"
RUN, CHECKPOINT = "run_1", "final-peft"
ARCHIVE = f"/api/v1/training_runs/{RUN}/checkpoints/{CHECKPOINT}/archive"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory) -> Path:
    """A real PEFT LoRA adapter dir on the tiny base, with non-zero B so it changes the model."""
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return out


def tar_of(files: dict[str, Path], folder: str = "checkpoint/") -> bytes:
    """A tar.gz as SkyRL writes a sampler checkpoint: the adapter files in one folder."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, path in files.items():
            tar.add(path, arcname=folder + name)
    return buf.getvalue()


class Server:
    """A real HTTP server on 127.0.0.1; `routes` maps a path to a function of the handler
    returning (status, headers, body). Every request's path and headers are kept."""

    def __init__(self, routes):
        self.seen = []
        seen = self.seen

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                seen.append((self.path, self.headers))
                route = routes.get(self.path.split("?")[0])
                status, headers, body = route(self) if route else (404, {}, b'{"detail": "Not Found"}')
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def keyed(body: bytes):
    """A route serving `body` to requests carrying the key, 401 to others."""
    return lambda h: (200, {}, body) if h.headers.get("X-API-Key") == KEY else (401, {}, b'{"detail": "no key"}')


def test_the_archive_fallback_installs_the_adapter_on_the_local_base(base, adapter, tmp_path):
    archive = tar_of({n: adapter / n for n in ("adapter_config.json", "adapter_model.safetensors", "README.md")})
    not_ready = iter([True, True, False])  # the checkpoint is still being written, twice
    api = Server({ARCHIVE: lambda h: (425, {}, b'{"detail": "still being created"}') if next(not_ready)
                  else (302, {"Location": f"/api/v1/training_runs/{RUN}/checkpoints/{CHECKPOINT}/download"}, b""),
                  f"/api/v1/training_runs/{RUN}/checkpoints/{CHECKPOINT}/download": keyed(archive)})
    try:
        fetch_archive(api.url + "/", KEY, f"tinker://{RUN}/sampler_weights/{CHECKPOINT}", tmp_path)
    finally:
        api.close()
    assert [p for p, _ in api.seen] == [ARCHIVE] * 3 + [ARCHIVE.replace("archive", "download")]
    dest = tmp_path / "student"
    dest.mkdir()
    install_adapter(tmp_path, dest, str(base))
    assert sorted(p.name for p in dest.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert check_adapter(dest, str(base)) == base  # recorded on the local base
    got, want = load_file(dest / "adapter_model.safetensors"), load_file(adapter / "adapter_model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), dest)  # peft loads it here
    ids = torch.tensor([tiny_tokenizer("chatml")("Ahoy there").input_ids])
    with torch.no_grad():
        adapted = model(ids).logits
        with model.disable_adapter():
            plain = model(ids).logits
    assert (adapted - plain).abs().max() > 1e-3  # the LoRA weights arrived, not zeros


def test_the_key_goes_to_the_api_only_never_to_a_signed_url_elsewhere(adapter, tmp_path):
    archive = tar_of({n: adapter / n for n in ("adapter_config.json", "adapter_model.safetensors")}, folder="")
    storage = Server({"/bucket/ck.tar.gz": lambda h: (200, {}, archive)})
    api = Server({ARCHIVE: lambda h: (307, {"Location": f"{storage.url}/bucket/ck.tar.gz?sig=abc"}, b"")})
    try:
        fetch_archive(api.url, KEY, f"tinker://{RUN}/{CHECKPOINT}", tmp_path)  # SkyRL's form of the path
    finally:
        api.close()
        storage.close()
    assert api.seen[0][1].get("X-API-Key") == KEY
    assert [p for p, _ in storage.seen] == ["/bucket/ck.tar.gz?sig=abc"] and "X-API-Key" not in storage.seen[0][1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_a_failed_download_or_a_wrong_archive_is_an_error_naming_the_checkpoint(adapter, tmp_path):
    api = Server({ARCHIVE: lambda h: (500, {}, f'{{"detail": "disk full, key {KEY}"}}'.encode())})
    path = f"tinker://{RUN}/sampler_weights/{CHECKPOINT}"
    try:
        with pytest.raises(ModelError, match=r"final-peft.*HTTP 500: .*disk full") as e:
            fetch_archive(api.url, KEY, path, tmp_path)
        assert KEY not in str(e.value)
        with pytest.raises(ModelError, match="HTTP 404"):
            fetch_archive(api.url, KEY, f"tinker://{RUN}/sampler_weights/other", tmp_path)
    finally:
        api.close()
    with pytest.raises(ModelError, match="not a sampler checkpoint"):
        fetch_archive(api.url, KEY, f"tinker://{RUN}/weights/{CHECKPOINT}", tmp_path)
    half = tmp_path / "half.tar"
    half.write_bytes(tar_of({"adapter_config.json": adapter / "adapter_config.json"}))
    with pytest.raises(ModelError, match=r"expected one each of adapter_config.json, adapter_model.safetensors"):
        extract_adapter(half, tmp_path, path)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"<html>login</html>")
    with pytest.raises(ModelError, match="not a readable tar file"):
        extract_adapter(junk, tmp_path, path)


def done(value=None, error: BaseException | None = None) -> concurrent.futures.Future:
    future = concurrent.futures.Future()
    future.set_exception(error) if error else future.set_result(value)
    return future


def status_error(cls, status: int, message: str):
    response = httpx.Response(status, request=httpx.Request("POST", "http://127.0.0.1/api/v1/asample"))
    return cls(message, response=response, body=None)


def test_a_failed_sample_is_that_rows_error_and_a_refused_key_stops_at_once(monkeypatch):
    monkeypatch.setenv("TINKER_API_KEY", KEY)
    tokenizer = tiny_tokenizer("chatml")
    sampler = TinkerSampler(client=None, tokenizer=tokenizer)
    ahoy = np.array(tokenizer("Ahoy").input_ids, dtype=np.int32)
    ok = types.SampleResponse(sequences=[types.SampledSequence(stop_reason="stop", sequence_id="s0", tokens_np=ahoy)])
    rows = [sampler.collect([1, 2, 3], f) for f in (
        done(ok),
        done(error=status_error(tinker.InternalServerError, 500, f"engine crashed holding {KEY}")),
        done(error=AssertionError("asample promises always carry sample_sequence_ids")),
        done(error=TimeoutError("no answer in 600s")))]
    assert (rows[0].text, rows[0].finish_reason, rows[0].prompt_tokens) == ("Ahoy", "stop", 3)
    assert [r.finish_reason for r in rows[1:]] == ["error"] * 3
    assert rows[1].error == "HTTP 500: engine crashed holding [redacted]"
    assert rows[2].error == "AssertionError: asample promises always carry sample_sequence_ids"
    assert rows[3].error == "TimeoutError: no answer in 600s"
    for status, cls in ((401, tinker.AuthenticationError), (404, tinker.NotFoundError)):
        with pytest.raises(ModelError, match=rf"Tinker refused the sample \(HTTP {status}: nope \[redacted\]\)"):
            sampler.collect([1], done(error=status_error(cls, status, f"nope {KEY}")))
