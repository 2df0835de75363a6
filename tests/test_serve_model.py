"""``server serve-model``: the fused LLM behind the federation's mTLS, called with the ``openai`` client.

A tiny signed logit fused folder (built as in tests/test_fuse_serve.py) is served on loopback by the
real uvicorn server with the federation's TLS 1.3 context; sites are CA-signed client certificates
of a real server folder, enrolled (or not) in its store.
"""

from __future__ import annotations

import json
import shutil
import ssl
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from fedproxy_secure.artifacts import create_keyset, generate_key, save_keyset
from fedproxy_secure.auditlog import verify_log
from fedproxy_secure.errors import ConfigError, SecurityError
from fedproxy_secure.fuse import generate_text
from fedproxy_secure.server.setup import server_paths
from fedproxy_secure.serving.generation import generate
from fedproxy_secure.serving.limits import RateLimiter
from fedproxy_secure.serving.prompting import chat_prompt, cut_at_stop, safe_stream_prefix
from fedproxy_secure.serving.requests import ChatMessage
from fedproxy_secure.serving.service import load_serve_context, uvicorn_serve_server
from fedproxy_secure.serving.settings import EffectiveLimit, parse_serve_settings
from fedproxy_secure.transport.pki import create_ca, issue_client_cert
from tests.artifacts_helpers import flip_byte
from tests.serve_helpers import KEEP, SPEC, fused_folder, server_folder, site

PROMPT = "Patient note: the dose was"
CHAT = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Which ward is quiet?"}]


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("serve_model")
    key = generate_key()
    ks = create_keyset(key, name="op")
    fused = fused_folder(tmp, key, SPEC, KEEP)
    d = server_folder(tmp / "srv", ks)
    sites = {n: site(d, tmp, n, enrol=n != "ghost") for n in ("site-a", "site-b", "site-c", "site-q", "ghost")}
    settings = parse_serve_settings({"rate_per_minute": 600, "burst": 50, "max_tokens_cap": 24,
                                     "sites": {"site-c": {"rate_per_minute": 1, "burst": 2},
                                               "site-q": {"tokens_per_day": 40}}})
    ctx = load_serve_context(fused, d, settings)
    server, th, port = _start(ctx, d)
    yield {"d": d, "tmp": tmp, "sites": sites, "ctx": ctx, "port": port, "fused": fused, "ks": ks, "key": key}
    server.should_exit = True
    th.join(10)


def _key(svc):
    return svc["key"]


def _http(svc, site: str | None = None, ca: Path | None = None) -> httpx.Client:
    """httpx client verifying the server against the federation CA, presenting ``site``'s certificate."""
    tls = ssl.create_default_context(cafile=str(ca or server_paths(svc["d"])["ca"]))
    if site is not None:
        folder = svc["sites"][site] if isinstance(site, str) and site in svc["sites"] else Path(site)
        tls.load_cert_chain(str(folder / "client.pem"), str(folder / "client.key"))
    return httpx.Client(verify=tls, timeout=60)


def _client(svc, site: str | None = "site-a", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"https://127.0.0.1:{svc['port']}/v1", api_key="not-used",
                         http_client=_http(svc, site, **kw), max_retries=0)


def _audit(svc) -> list[dict]:
    lines = server_paths(svc["d"])["audit"].read_text().splitlines()
    return [json.loads(x) for x in lines]


def _serve_entries(svc) -> list[dict]:
    return [e["data"] for e in _audit(svc) if e["event"] == "serve_request"]


# --------------------------------------------------------------------------- the API
def test_models_lists_the_verified_fused_model(svc):
    ids = [m.id for m in _client(svc).models.list().data]
    assert ids == [svc["ctx"].model_id] and ids[0] == "fedproxy-fused-logit-r2"


def test_completion_is_the_greedy_continuation_of_the_fused_model(svc):
    ctx = svc["ctx"]
    r = _client(svc).completions.create(model=ctx.model_id, prompt=PROMPT, max_tokens=8)
    want = generate_text(ctx.model, PROMPT, max_new_tokens=8)
    assert r.choices[0].text == want and len(want) > 0
    n_prompt = len(ctx.tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    assert r.usage.prompt_tokens == n_prompt and 1 <= r.usage.completion_tokens <= 8
    assert r.choices[0].finish_reason in ("stop", "length") and r.model == ctx.model_id


def test_chat_completion_and_its_stream_give_the_same_text(svc):
    ctx = svc["ctx"]
    cl = _client(svc)
    r = cl.chat.completions.create(model=ctx.model_id, messages=CHAT, max_tokens=12)
    text = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant" and len(text) > 0
    # the tiny tokenizer has no chat template: the documented plain template is what the model saw
    assert not getattr(ctx.tokenizer, "chat_template", None)
    plain = "system: You answer briefly.\nuser: Which ward is quiet?\nassistant:"
    assert generate(ctx.model, ctx.tokenizer, plain, 12, []).text == text
    deltas, finish = [], None
    for chunk in cl.chat.completions.create(model=ctx.model_id, messages=CHAT, max_tokens=12, stream=True):
        c = chunk.choices[0]
        if c.delta.content:
            deltas.append(c.delta.content)
        finish = c.finish_reason or finish
    assert "".join(deltas) == text
    assert len(deltas) > 1 and finish == r.choices[0].finish_reason


def test_stop_strings_cut_the_text_streamed_or_not(svc):
    ctx = svc["ctx"]
    cl = _client(svc)
    full = cl.completions.create(model=ctx.model_id, prompt=PROMPT, max_tokens=16).choices[0].text
    assert len(full) >= 4
    stop = full[2:4]
    want = full[:full.find(stop)]
    r = cl.completions.create(model=ctx.model_id, prompt=PROMPT, max_tokens=16, stop=[stop])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in cl.completions.create(model=ctx.model_id, prompt=PROMPT,
                                                                          max_tokens=16, stop=stop, stream=True))
    assert streamed == want


def test_max_tokens_over_the_cap_and_unknown_model_are_refused(svc):
    cl = _client(svc)
    with pytest.raises(openai.BadRequestError, match="cap of 24"):
        cl.completions.create(model=svc["ctx"].model_id, prompt=PROMPT, max_tokens=25)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        cl.completions.create(model="gpt-4o", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="stop"):
        cl.completions.create(model=svc["ctx"].model_id, prompt=PROMPT, max_tokens=2, stop=list("abcde"))
    with pytest.raises(openai.BadRequestError, match="messages"):
        cl.chat.completions.create(model=svc["ctx"].model_id, messages=[], max_tokens=2)
    raw = _http(svc, "site-a").post(f"https://127.0.0.1:{svc['port']}/v1/completions", content=b'{"model": 1,,}',
                                    headers={"content-type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"


def test_rate_limit_per_site_gives_429_with_retry_after_and_spares_other_sites(svc):
    cl = _client(svc, "site-c")  # burst 2, 1 request per minute
    cl.models.list()
    cl.models.list()
    with pytest.raises(openai.RateLimitError) as ei:
        cl.models.list()
    assert ei.value.status_code == 429
    retry = int(ei.value.response.headers["retry-after"])
    assert 1 <= retry <= 60
    assert _client(svc, "site-a").models.list().data  # another site's bucket is untouched
    assert _serve_entries(svc)[-2]["status"] == 429 and _serve_entries(svc)[-2]["site"] == "site-c"


def test_daily_token_quota_refuses_with_429_insufficient_quota_and_spares_other_sites(svc):
    ctx = svc["ctx"]
    cl = _client(svc, "site-q")  # 40 tokens per day
    n_prompt = len(ctx.tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    assert n_prompt + 8 <= 40 < 2 * n_prompt
    r = cl.completions.create(model=ctx.model_id, prompt=PROMPT, max_tokens=8)
    assert ctx.quota.used("site-q") == r.usage.prompt_tokens + r.usage.completion_tokens  # unused max_tokens back
    with pytest.raises(openai.RateLimitError) as ei:
        cl.completions.create(model=ctx.model_id, prompt=PROMPT, max_tokens=8)
    body = ei.value.response.json()["error"]
    assert body["type"] == body["code"] == "insufficient_quota" and "tokens_per_day" in body["message"]
    assert 1 <= int(ei.value.response.headers["retry-after"]) <= 86_400
    assert _client(svc, "site-a").completions.create(model=ctx.model_id, prompt=PROMPT, max_tokens=2).choices
    last = [e for e in _serve_entries(svc) if e["site"] == "site-q"][-1]
    assert last["status"] == 429 and last["prompt_tokens"] == 0


def test_a_site_with_a_full_queue_gets_429_while_another_site_is_served(svc):
    from fedproxy_secure.serving.scheduler import FairScheduler

    ctx = svc["ctx"]
    gate, real = threading.Event(), ctx.scheduler

    class Held:  # a request of site-a that holds its one queue place until released
        step_tokens, result = 1, None

        def step(self) -> bool:
            return gate.wait(30)

    ctx.scheduler = FairScheduler(max_queued=1)
    try:
        held = ctx.scheduler.submit("site-a", Held())
        with pytest.raises(openai.RateLimitError, match="max_queued_per_site"):
            _client(svc, "site-a").completions.create(model=ctx.model_id, prompt=PROMPT, max_tokens=2)
        # site-b's request is not stuck behind site-a's queue; it decodes once the step in flight ends
        got: list = []
        th = threading.Thread(target=lambda: got.append(_client(svc, "site-b").completions.create(
            model=ctx.model_id, prompt=PROMPT, max_tokens=2)))
        th.start()
        time.sleep(0.5)
        gate.set()
        th.join(30)
        assert got and got[0].choices[0].text is not None and held.done()
    finally:
        gate.set()
        ctx.scheduler.close()
        ctx.scheduler = real


# --------------------------------------------------------------------------- who may call
def test_a_client_without_a_certificate_is_refused_at_the_handshake(svc):
    before = len(_audit(svc))
    with pytest.raises(openai.APIConnectionError):
        _client(svc, None).models.list()
    # refused by TLS: no request reached the app, so nothing was audited
    assert len(_audit(svc)) == before
    with pytest.raises(httpx.TransportError):
        _http(svc, None).get(f"https://127.0.0.1:{svc['port']}/v1/models")


def test_a_certificate_of_another_ca_is_refused_at_the_handshake(svc, tmp_path):
    other = create_ca(tmp_path / "otherca")
    issue_client_cert(other, "site-a", tmp_path / "mallory")  # claims an enrolled site's name
    with pytest.raises(openai.APIConnectionError):
        _client(svc, str(tmp_path / "mallory")).models.list()


def _start(ctx, d: Path):
    return _start_with(ctx, d)


def _start_with(ctx, d: Path, **kw):
    from tests.net_helpers import free_port

    port = free_port()
    server = uvicorn_serve_server(ctx, d, port=port, **kw)
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    t0 = time.time()
    while not server.started:
        assert th.is_alive() and time.time() - t0 < 30, "serve-model did not start"
        time.sleep(0.05)
    return server, th, port


def test_unenrolled_and_revoked_sites_are_refused(svc):
    from fedproxy_secure.server.revocation import record_issued, revoke_site
    from fedproxy_secure.transport.pki import load_cert

    with pytest.raises(openai.PermissionDeniedError, match="not enrolled"):
        _client(svc, "ghost").models.list()
    # site-b's certificate recorded as CSR enrolment records it (so revoke-site puts its serial in the CRL)
    cert = load_cert(svc["sites"]["site-b"] / "client.pem")
    record_issued(svc["d"], "site-b", "c-b", cert.serial_number, time.time() + 3600, "0" * 64)
    cl = _client(svc, "site-b")
    assert cl.models.list().data  # enrolled, active, the issued certificate: served
    assert revoke_site(svc["d"], "site-b")["crl"] is not None
    # the running server refuses it at once (per request), on the connection it already holds
    with pytest.raises(openai.PermissionDeniedError, match="revoked"):
        cl.completions.create(model=svc["ctx"].model_id, prompt=PROMPT, max_tokens=2)
    last = _serve_entries(svc)[-1]
    assert last["site"] == "site-b" and last["status"] == 403 and last["completion_tokens"] == 0
    # a server started after the revocation loads the CA-signed CRL: refused at the handshake
    server, th, port = _start(svc["ctx"], svc["d"])
    try:
        url = f"https://127.0.0.1:{port}/v1/models"
        with pytest.raises(httpx.TransportError):
            _http(svc, "site-b").get(url)
        assert _http(svc, "site-a").get(url).status_code == 200
    finally:
        server.should_exit = True
        th.join(10)


def test_only_the_certificate_issued_at_enrolment_is_accepted_for_a_site(svc, tmp_path):
    from fedproxy_secure.server.revocation import record_issued

    d = svc["d"]
    svc["sites"]["site-d"] = site(d, svc["tmp"], "site-d", enrol=True)
    assert _client(svc, "site-d").models.list().data
    # the site's CSR enrolment recorded another serial: this certificate (a second one for the name) is refused
    record_issued(d, "site-d", "c-x", 12345, time.time() + 3600, "0" * 64)
    with pytest.raises(openai.PermissionDeniedError, match="not the one issued"):
        _client(svc, "site-d").models.list()


# --------------------------------------------------------------------------- audit
def test_one_audit_entry_per_request_without_prompt_or_completion_text(svc):
    ctx = svc["ctx"]
    secret_prompt = "Mrs Zyxwvut, MRN 99812, bed 7:"
    before = len(_serve_entries(svc))
    cl = _client(svc)
    r = cl.completions.create(model=ctx.model_id, prompt=secret_prompt, max_tokens=10)
    s = "".join(c.choices[0].delta.content or "" for c in cl.chat.completions.create(
        model=ctx.model_id, messages=[{"role": "user", "content": secret_prompt}], max_tokens=10, stream=True))
    time.sleep(0.3)  # the streamed request is audited when its generation ends
    new = _serve_entries(svc)[before:]
    assert [e["endpoint"] for e in new] == ["/v1/completions", "/v1/chat/completions"]
    for e in new:
        assert set(e) == {"site", "endpoint", "status", "model", "prompt_tokens", "completion_tokens", "latency_ms"}
        assert e["site"] == "site-a" and e["status"] == 200 and e["prompt_tokens"] > 0 and e["latency_ms"] > 0
    assert new[0]["completion_tokens"] == r.usage.completion_tokens
    raw = server_paths(svc["d"])["audit"].read_text()
    for text in (secret_prompt, "Zyxwvut", "99812", r.choices[0].text, s):
        assert len(text) >= 3 and text not in raw and json.dumps(text)[1:-1] not in raw
    res = verify_log(server_paths(svc["d"])["audit"])
    assert res.ok, res.message()


# --------------------------------------------------------------------------- loading and settings
def test_the_model_is_loaded_only_after_its_signature_verifies(svc, tmp_path):
    wrong = tmp_path / "ks.json"
    save_keyset(create_keyset(generate_key(), name="op"), wrong)
    with pytest.raises(SecurityError, match="does not verify"):
        load_serve_context(svc["fused"], svc["d"], parse_serve_settings({}), keyset=wrong)
    bad = tmp_path / "fused"
    shutil.copytree(svc["fused"], bad)
    flip_byte(bad / "adapter" / "adapter_model.safetensors")
    with pytest.raises(SecurityError, match="tampered"):
        load_serve_context(bad, svc["d"], parse_serve_settings({}))
    with pytest.raises(ConfigError, match="--keyset"):
        load_serve_context(svc["fused"], svc["d"], parse_serve_settings({}), keyset=tmp_path / "missing.json")


def test_cli_names_the_option_when_the_server_folder_is_wrong(tmp_path):
    from typer.testing import CliRunner

    from fedproxy_secure.cli.main import _load_commands
    from fedproxy_secure.cli.app import app

    _load_commands()
    r = CliRunner().invoke(app, ["server", "serve-model", "--fused", str(tmp_path), "--dir", str(tmp_path / "none")])
    assert r.exit_code == 2 and "--dir" in r.output
    r = CliRunner().invoke(app, ["server", "serve-model", "--fused", str(tmp_path), "--dir", str(tmp_path),
                                 "--burst", "0"])
    assert r.exit_code == 2 and "burst" in r.output


def test_settings_are_validated_with_the_field_named():
    with pytest.raises(ConfigError, match="rate_per_minute"):
        parse_serve_settings({"rate_per_minute": 0})
    with pytest.raises(ConfigError, match="sites.x.burst"):
        parse_serve_settings({"sites": {"x": {"rate_per_minute": 1, "burst": 0}}})
    with pytest.raises(ConfigError, match="'rate'.*[Ee]xtra inputs"):
        parse_serve_settings({"rate": 5})
    with pytest.raises(ConfigError, match="default_max_tokens"):
        parse_serve_settings({"max_tokens_cap": 4, "default_max_tokens": 8})


def test_token_bucket_refills_at_the_configured_rate():
    now = [100.0]
    s = parse_serve_settings({"rate_per_minute": 30, "burst": 3, "sites": {"big": {"rate_per_minute": 600, "burst": 1}}})
    rl = RateLimiter(s, clock=lambda: now[0])
    assert [rl.try_acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = rl.try_acquire("a")
    assert wait == pytest.approx(2.0)  # 30/min = one token per 2 s
    assert rl.try_acquire("b") == 0.0  # per site
    now[0] += 1.0
    assert rl.try_acquire("a") == pytest.approx(1.0)
    now[0] += 1.0
    assert rl.try_acquire("a") == 0.0
    now[0] += 1000.0
    assert [rl.try_acquire("a") for _ in range(4)][-1] > 0  # refill is capped at the burst
    assert s.limit_for("big") == EffectiveLimit(rate_per_minute=600, burst=1, tokens_per_day=100_000)
    assert rl.try_acquire("big") == 0.0 and rl.try_acquire("big") == pytest.approx(0.1)


def test_stop_and_stream_prefix_rules():
    assert cut_at_stop("abc END def", ["END", "c E"]) == ("ab", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)
    assert safe_stream_prefix("hello EN", ["END"]) == "hello "
    assert safe_stream_prefix("hello E", ["END", "Eq"]) == "hello "
    assert safe_stream_prefix("hello", ["END"]) == "hello"
    assert safe_stream_prefix("caf\ufffd", []) == "caf"


def test_chat_prompt_uses_the_template_when_the_tokenizer_has_one():
    from fedproxy_secure.models.tiny import byte_tokenizer

    tok = byte_tokenizer()
    msgs = [ChatMessage(role="user", content="hi")]
    assert chat_prompt(tok, msgs) == "user: hi\nassistant:"
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}" \
                        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    assert chat_prompt(tok, msgs) == "<|user|>hi<|assistant|>"


def test_verify_fused_command_checks_and_copies_the_verified_bytes(svc, tmp_path):
    from typer.testing import CliRunner

    from fedproxy_secure.cli.app import app
    from fedproxy_secure.cli.main import _load_commands

    _load_commands()
    ks = server_paths(svc["d"])["keyset"]
    r = CliRunner().invoke(app, ["server", "verify-fused", "--fused", str(svc["fused"]), "--keyset", str(ks),
                                 "--copy-to", str(tmp_path / "copy")])
    assert r.exit_code == 0, r.output
    assert "method logit" in r.output
    assert (tmp_path / "copy" / "llm" / "model.safetensors").read_bytes() == \
        (svc["fused"] / "llm" / "model.safetensors").read_bytes()
    bad = tmp_path / "bad"
    shutil.copytree(svc["fused"], bad)
    (bad / "fused.json").write_text((bad / "fused.json").read_text().replace("0.8", "5.0"))
    r = CliRunner().invoke(app, ["server", "verify-fused", "--fused", str(bad), "--keyset", str(ks)])
    assert r.exit_code == 1 and "invalid" in r.output


def test_a_dense_fused_folder_decodes_like_the_reference_greedy(svc):
    from fedproxy_secure.fuse import load_fused_model, write_dense_folder

    tmp = svc["tmp"]
    out = tmp / "dense"
    write_dense_folder(tmp / "llm", tmp / "proxy", tmp / "adapter", out, _key(svc), method="weight")
    model = load_fused_model(out, svc["ks"])
    for prompt in (PROMPT, "Hello"):
        assert generate(model, model.tokenizer, prompt, 9, []).text == generate_text(model, prompt, max_new_tokens=9)


def test_client_ask_gets_the_answer_and_exit_after_stops_the_server(svc):
    from typer.testing import CliRunner

    from fedproxy_secure.cli.app import app
    from fedproxy_secure.cli.main import _load_commands

    _load_commands()
    ctx = svc["ctx"]
    site = svc["sites"]["site-a"]
    shutil.copy(server_paths(svc["d"])["ca"], site / "ca.pem")  # the kit's CA certificate
    want = _client(svc).chat.completions.create(model=ctx.model_id, messages=[{"role": "user", "content": "Hello?"}],
                                                max_tokens=6).choices[0].message.content
    server, th, port = _start_with(ctx, svc["d"], exit_after=1)
    try:
        r = CliRunner().invoke(app, ["client", "ask", "--dir", str(site), "--url", f"https://127.0.0.1:{port}",
                                     "--max-tokens", "6"], input="Hello?\n")  # the question on stdin
        assert r.exit_code == 0, r.output
        assert want.strip() and want.strip() in r.output and "completion tokens" in r.output
        th.join(15)
        assert not th.is_alive()  # --exit-after 1: stopped after the one completion
    finally:
        server.should_exit = True
        ctx.on_completions, ctx.completions_done = None, 0
    question = svc["tmp"] / "question.txt"
    question.write_text("Hello?\n")
    r = CliRunner().invoke(app, ["client", "ask", "--dir", str(site), "--url", f"https://127.0.0.1:{svc['port']}",
                                 "--max-tokens", "6", "--prompt-file", str(question)])
    assert r.exit_code == 0 and want.strip() in r.output, r.output
    r = CliRunner().invoke(app, ["client", "ask", "--dir", str(svc["sites"]["ghost"]), "--url",
                                 f"https://127.0.0.1:{svc['port']}"], input="Hello?")
    assert r.exit_code == 2 and "ca.pem" in r.output
