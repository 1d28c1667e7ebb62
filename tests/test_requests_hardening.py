"""Requests as an attacker sends them: a corpus of malformed ModelInferRequests, a hypothesis
fuzz and bit-flipped messages, against a real server on port 0 (a tiny BERT base and one
adapter). Each malformed request gets its own status code, never INTERNAL or UNKNOWN, and a
valid request right after it gets the right answer."""

from __future__ import annotations

import os
import random
import struct
import time
from collections import Counter

import grpc
import numpy as np
import pytest
import torch
from helpers import tol

import tiny_models
from runtime.config import ServeConfig
from runtime.errors import MAX_MESSAGE, clip
from runtime.kserve import inference_pb2 as pb
from runtime.kserve import inference_pb2_grpc as pb_grpc
from wara_train.basespec import resolve_base
from wara_train.synthetic import random_adapter

C = grpc.StatusCode
INFER = "/inference.GRPCInferenceService/ModelInfer"
VALID_TEXT = b"the movie was really good"
VOCAB = len(tiny_models.SPECIAL_TOKENS) + len(tiny_models.vocab_words())  # 102
MAX_LEN = tiny_models.MAX_POSITIONS
FUZZ_EXAMPLES = int(os.environ.get("WARA_FUZZ_EXAMPLES", "2000"))


@pytest.fixture(scope="module")
def served(tmp_path_factory, live_servers):
    tmp = tmp_path_factory.mktemp("hardening")
    bert = tiny_models.make_bert_classifier(tmp / "bert")
    spec = resolve_base(f"hf:{bert}", name="b")
    root = tmp / "adapters"
    random_adapter(spec, root / "a", rank=2, seed=7)
    config = ServeConfig(bases=(f"b=hf:{bert}",), backend="torch", port=0, adapter_root=str(root), max_delay_ms=1.0)
    server, port, channel = live_servers.start(config, options=[("grpc.max_receive_message_length", 64 << 20),
                                                                ("grpc.max_send_message_length", 64 << 20)])
    raw = channel.unary_unary(INFER, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    service = server.service
    _, expected = service.predict("a", {"text": np.array([VALID_TEXT], dtype=object)})
    return {"service": service, "stub": pb_grpc.GRPCInferenceServiceStub(channel), "raw": raw,
            "channel": channel, "expected": expected["logits"][0], "config": config}


# --- request builders --------------------------------------------------------------------
def text(texts=(VALID_TEXT,), *, model="a", shape=None, datatype="BYTES", name="text", **kw) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, **kw)
    t = req.inputs.add(name=name, datatype=datatype, shape=[len(texts)] if shape is None else shape)
    t.contents.bytes_contents.extend(texts)
    return req


def raw_bytes(elements) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def ids(input_ids, mask=None, *, model="a", dtype=np.int64, datatype="INT64", mask_datatype=None,
        shape=None, mask_shape=None) -> pb.ModelInferRequest:
    """input_ids + attention_mask as raw contents."""
    input_ids = np.asarray(input_ids, dtype=dtype)
    mask = np.ones_like(input_ids) if mask is None else np.asarray(mask, dtype=dtype)
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="input_ids", datatype=datatype, shape=list(input_ids.shape) if shape is None else shape)
    req.inputs.add(name="attention_mask", datatype=mask_datatype or datatype,
                   shape=list(mask.shape) if mask_shape is None else mask_shape)
    req.raw_input_contents.extend([input_ids.tobytes(), mask.tobytes()])
    return req


def with_(req: pb.ModelInferRequest, fn) -> pb.ModelInferRequest:
    fn(req)
    return req


def set_name_bytes(message: bytes, field: int, value: bytes) -> bytes:
    """Append a length-delimited string field (wire type 2) with arbitrary bytes."""
    return message + bytes([(field << 3) | 2]) + _varint(len(value)) + value


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def input_with_bad_utf8(field: int) -> bytes:
    """A request whose input has a name (field 1) or datatype (field 2) that is not UTF-8."""
    tensor = pb.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(VALID_TEXT)
    body = set_name_bytes(tensor.SerializeToString(), field, b"\xff\xfe")
    return pb.ModelInferRequest(model_name="a").SerializeToString() + b"\x22" + _varint(len(body)) + body


TOKENS = [2, 30, 40, 3]  # [CLS] w w [SEP]
LONG = "x" * (1 << 20)
VALID = text().SerializeToString()

# (label, request or raw bytes, expected code, a substring the message must hold or None)
CORPUS: list[tuple[str, object, grpc.StatusCode, str | None]] = [
    # model names and versions
    ("empty model name", text(model=""), C.NOT_FOUND, None),
    ("unknown model", text(model="nope"), C.NOT_FOUND, "nope"),
    ("1 MB model name", text(model=LONG), C.NOT_FOUND, "chars"),
    ("NUL model name", text(model="\x00"), C.NOT_FOUND, None),
    ("path model name", text(model="../a"), C.NOT_FOUND, None),
    ("unicode model name", text(model="ä" * 20), C.NOT_FOUND, None),
    ("129-char model name", text(model="a" * 129), C.NOT_FOUND, None),
    ("model name of invalid UTF-8", set_name_bytes(b"", 1, b"\xc3\x28") + VALID, C.INVALID_ARGUMENT, "parse"),
    ("adapter version unknown", text(model_version="999"), C.NOT_FOUND, "999"),
    ("base version 2", text(model="b", model_version="2"), C.NOT_FOUND, None),
    ("1 MB version", text(model_version=LONG), C.NOT_FOUND, None),
    ("negative version", text(model="b", model_version="-1"), C.NOT_FOUND, None),
    # inputs: names and counts
    ("no inputs", pb.ModelInferRequest(model_name="a"), C.INVALID_ARGUMENT, "no inputs"),
    ("empty input name", text(name=""), C.INVALID_ARGUMENT, "no name"),
    ("unknown input name", text(name="foo"), C.INVALID_ARGUMENT, "foo"),
    ("1 MB input name", text(name=LONG), C.INVALID_ARGUMENT, "chars"),
    ("input name of invalid UTF-8", input_with_bad_utf8(1), C.INVALID_ARGUMENT, "parse"),
    ("duplicate text inputs", with_(text(), lambda r: r.inputs.append(r.inputs[0])), C.INVALID_ARGUMENT, "twice"),
    ("65 inputs", with_(pb.ModelInferRequest(model_name="a"), lambda r: [
        r.inputs.add(name=f"i{k}", datatype="INT64", shape=[1]).contents.int64_contents.append(1) for k in range(65)]),
     C.INVALID_ARGUMENT, "at most"),
    ("text and input_ids", with_(text(), lambda r: r.inputs.add(name="input_ids", datatype="INT64", shape=[1, 4])
                                 .contents.int64_contents.extend(TOKENS)), C.INVALID_ARGUMENT, "either"),
    ("input_ids without mask", with_(pb.ModelInferRequest(model_name="a"), lambda r: r.inputs.add(
        name="input_ids", datatype="INT64", shape=[1, 4]).contents.int64_contents.extend(TOKENS)),
     C.INVALID_ARGUMENT, "missing"),
    ("mask without input_ids", with_(pb.ModelInferRequest(model_name="a"), lambda r: r.inputs.add(
        name="attention_mask", datatype="INT64", shape=[1, 4]).contents.int64_contents.extend([1] * 4)),
     C.INVALID_ARGUMENT, "missing"),
    ("extra third input", with_(ids([TOKENS]), lambda r: (r.inputs.add(name="token_type_ids", datatype="INT64",
                                                                       shape=[1, 4]),
                                                          r.raw_input_contents.append(bytes(32)))),
     C.INVALID_ARGUMENT, "token_type_ids"),
    ("image_bytes to a text base", text(name="image_bytes"), C.INVALID_ARGUMENT, "image_bytes"),
    # datatypes
    ("empty datatype", text(datatype=""), C.INVALID_ARGUMENT, "datatype"),
    ("STRING datatype", text(datatype="STRING"), C.INVALID_ARGUMENT, "datatype"),
    ("lowercase bytes", text(datatype="bytes"), C.INVALID_ARGUMENT, "datatype"),
    ("1 MB datatype", text(datatype=LONG), C.INVALID_ARGUMENT, "chars"),
    ("datatype of invalid UTF-8", input_with_bad_utf8(2), C.INVALID_ARGUMENT, "parse"),
    ("text as FP32", with_(pb.ModelInferRequest(model_name="a"), lambda r: r.inputs.add(
        name="text", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)), C.INVALID_ARGUMENT, "BYTES"),
    ("text as BOOL", with_(pb.ModelInferRequest(model_name="a"), lambda r: r.inputs.add(
        name="text", datatype="BOOL", shape=[1]).contents.bool_contents.append(True)), C.INVALID_ARGUMENT, "BYTES"),
    ("input_ids as INT32", ids([TOKENS], dtype=np.int32, datatype="INT32"), C.INVALID_ARGUMENT, "INT64"),
    ("mask as INT32", ids([TOKENS], mask_datatype="INT32"), C.INVALID_ARGUMENT, None),
    ("input_ids as FP64", ids([TOKENS], dtype=np.float64, datatype="FP64"), C.INVALID_ARGUMENT, "INT64"),
    ("FP16 typed contents", with_(pb.ModelInferRequest(model_name="a"), lambda r: r.inputs.add(
        name="text", datatype="FP16", shape=[1]).contents.fp32_contents.append(1.0)),
     C.INVALID_ARGUMENT, "raw_input_contents"),
    ("input_ids as BYTES", with_(pb.ModelInferRequest(model_name="a"), lambda r: (
        r.inputs.add(name="input_ids", datatype="BYTES", shape=[1, 1]),
        r.inputs.add(name="attention_mask", datatype="INT64", shape=[1, 1]),
        r.raw_input_contents.extend([raw_bytes([b"x"]), np.ones(1, np.int64).tobytes()]))), C.INVALID_ARGUMENT, None),
    ("INT8 typed 300", with_(pb.ModelInferRequest(model_name="a"), lambda r: r.inputs.add(
        name="text", datatype="INT8", shape=[1]).contents.int_contents.append(300)), C.INVALID_ARGUMENT, "range"),
    ("UINT8 typed 256", with_(pb.ModelInferRequest(model_name="a"), lambda r: r.inputs.add(
        name="text", datatype="UINT8", shape=[1]).contents.uint_contents.append(256)), C.INVALID_ARGUMENT, "range"),
    # shapes
    ("empty shape", text(shape=[]), C.INVALID_ARGUMENT, "scalar"),
    ("shape [-1]", text(shape=[-1]), C.INVALID_ARGUMENT, "negative"),
    ("shape [1, -5]", text(shape=[1, -5]), C.INVALID_ARGUMENT, "negative"),
    ("shape [2**62, 0]", text(shape=[2**62, 0]), C.INVALID_ARGUMENT, "empty"),
    ("shape [0, 2**62]", text(shape=[0, 2**62]), C.INVALID_ARGUMENT, "empty"),
    ("shape [2**62, 2**62]", text(shape=[2**62, 2**62]), C.INVALID_ARGUMENT, "values"),
    ("shape [2**63 - 1]", text(shape=[2**63 - 1]), C.INVALID_ARGUMENT, "values"),
    ("raw shape [2**40, 2**40]", with_(pb.ModelInferRequest(model_name="a"), lambda r: (
        r.inputs.add(name="text", datatype="BYTES", shape=[2**40, 2**40]), r.raw_input_contents.append(raw_bytes([b"a"])))),
     C.INVALID_ARGUMENT, "shorter"),
    ("shape [-2**63]", text(shape=[-2**63]), C.INVALID_ARGUMENT, "negative"),
    ("17 axes", text(shape=[1] * 17), C.INVALID_ARGUMENT, "axes"),
    ("text shape [0]", text([], shape=[0]), C.INVALID_ARGUMENT, "empty"),
    ("text shape [1, 1, 1]", text(shape=[1, 1, 1]), C.INVALID_ARGUMENT, "shape"),
    ("text shape [1, 2]", text([VALID_TEXT] * 2, shape=[1, 2]), C.INVALID_ARGUMENT, "shape"),
    ("text shape [1] with 2 values", text([VALID_TEXT] * 2, shape=[1]), C.INVALID_ARGUMENT, "values"),
    ("text shape [2] with 1 value", text(shape=[2]), C.INVALID_ARGUMENT, "values"),
    ("text shape [1, 2**31]", text(shape=[1, 2**31]), C.INVALID_ARGUMENT, "values"),
    ("17 M INT8 elements (raw)", with_(pb.ModelInferRequest(model_name="a"), lambda r: (
        r.inputs.add(name="text", datatype="INT8", shape=[1, 17 << 20]), r.raw_input_contents.append(bytes(17 << 20)))),
     C.RESOURCE_EXHAUSTED, "max_request_elements"),
    ("input_ids [1, 0]", ids(np.zeros((1, 0))), C.INVALID_ARGUMENT, "empty"),
    ("input_ids [0, 4]", ids(np.zeros((0, 4))), C.INVALID_ARGUMENT, "empty"),
    ("input_ids 1-D", ids(TOKENS), C.INVALID_ARGUMENT, "shape"),
    ("input_ids 3-D", ids([[TOKENS]]), C.INVALID_ARGUMENT, "shape"),
    ("sequence of 65 tokens", ids([[2] + [30] * 63 + [3]]), C.INVALID_ARGUMENT, str(MAX_LEN)),
    ("sequence of 10,000 tokens", ids([[30] * 10_000]), C.INVALID_ARGUMENT, str(MAX_LEN)),
    ("ids and mask lengths differ", ids([TOKENS], [[1, 1, 1]]), C.INVALID_ARGUMENT, "differ"),
    ("ids and mask batches differ", ids([TOKENS, TOKENS], [[1, 1, 1, 1]]), C.INVALID_ARGUMENT, "differ"),
    ("declared shape disagrees with raw length", ids([TOKENS], shape=[1, 5]), C.INVALID_ARGUMENT, "bytes"),
    # limits
    ("33 texts (max_batch 32)", text([VALID_TEXT] * 33), C.RESOURCE_EXHAUSTED, "max_batch"),
    ("1,024 texts", text([VALID_TEXT] * 1024), C.RESOURCE_EXHAUSTED, "max_batch"),
    ("33 rows of ids", ids([TOKENS] * 33), C.RESOURCE_EXHAUSTED, "max_batch"),
    ("33 rows to the base", text([VALID_TEXT] * 33, model="b"), C.RESOURCE_EXHAUSTED, "max_batch"),
    ("10,000 empty strings", text([b""] * 10_000), C.RESOURCE_EXHAUSTED, "max_batch"),
    ("10,000 empty strings in one row", text([b""] * 10_000, shape=[1, 10_000]), C.RESOURCE_EXHAUSTED,
     "max_bytes_elements"),
    ("one 16 MB text", text([b"good " * ((16 << 20) // 5)]), C.RESOURCE_EXHAUSTED, "max_text_bytes"),
    ("one 17 MB BYTES element (raw)", with_(pb.ModelInferRequest(model_name="a"), lambda r: (
        r.inputs.add(name="text", datatype="BYTES", shape=[1]), r.raw_input_contents.append(raw_bytes([b"a" * (17 << 20)])))),
     C.RESOURCE_EXHAUSTED, "max_bytes_element_mb"),
    ("one 70 KB text", text([b"good " * 14_000]), C.RESOURCE_EXHAUSTED, "max_text_bytes"),
    ("32 texts of 40 KB", text([b"nice " * 8_000] * 32), C.RESOURCE_EXHAUSTED, "max_request_text_bytes"),
    ("text of invalid UTF-8", text([b"\xff\xfe bad"]), C.INVALID_ARGUMENT, "UTF-8"),
    # contents
    ("1 raw content for 2 inputs", with_(ids([TOKENS]), lambda r: r.raw_input_contents.pop()), C.INVALID_ARGUMENT, "raw"),
    ("3 raw contents for 2 inputs", with_(ids([TOKENS]), lambda r: r.raw_input_contents.append(b"")),
     C.INVALID_ARGUMENT, "raw"),
    ("raw INT64 short by one byte", with_(ids([TOKENS]), lambda r: r.raw_input_contents.__setitem__(0, bytes(31))),
     C.INVALID_ARGUMENT, "bytes"),
    ("raw INT64 one byte long", with_(ids([TOKENS]), lambda r: r.raw_input_contents.__setitem__(0, bytes(33))),
     C.INVALID_ARGUMENT, "bytes"),
    ("raw INT64 empty", with_(ids([TOKENS]), lambda r: r.raw_input_contents.__setitem__(0, b"")),
     C.INVALID_ARGUMENT, "bytes"),
    ("raw BYTES length runs past the end", with_(pb.ModelInferRequest(model_name="a"), lambda r: (
        r.inputs.add(name="text", datatype="BYTES", shape=[1]), r.raw_input_contents.append(struct.pack("<I", 100) + b"ab"))),
     C.INVALID_ARGUMENT, "past the end"),
    ("raw BYTES length 2**32 - 1", with_(pb.ModelInferRequest(model_name="a"), lambda r: (
        r.inputs.add(name="text", datatype="BYTES", shape=[1]), r.raw_input_contents.append(b"\xff\xff\xff\xff"))),
     C.INVALID_ARGUMENT, "past the end"),
    ("raw BYTES trailing bytes", with_(pb.ModelInferRequest(model_name="a"), lambda r: (
        r.inputs.add(name="text", datatype="BYTES", shape=[1]), r.raw_input_contents.append(raw_bytes([b"good"]) + b"x"))),
     C.INVALID_ARGUMENT, "after"),
    ("raw BYTES cut length prefix", with_(pb.ModelInferRequest(model_name="a"), lambda r: (
        r.inputs.add(name="text", datatype="BYTES", shape=[1]), r.raw_input_contents.append(b"\x01\x00"))),
     C.INVALID_ARGUMENT, "shorter"),
    ("raw BYTES fewer elements than the shape", with_(pb.ModelInferRequest(model_name="a"), lambda r: (
        r.inputs.add(name="text", datatype="BYTES", shape=[3]), r.raw_input_contents.append(raw_bytes([b"a", b"b"])))),
     C.INVALID_ARGUMENT, "shorter"),
    ("raw and typed contents", with_(ids([TOKENS]), lambda r: r.inputs[0].contents.int64_contents.extend(TOKENS)),
     C.INVALID_ARGUMENT, "typed"),
    ("text in int64_contents", with_(pb.ModelInferRequest(model_name="a"), lambda r: r.inputs.add(
        name="text", datatype="BYTES", shape=[1]).contents.int64_contents.append(5)), C.INVALID_ARGUMENT, "int64_contents"),
    ("text with fp32_contents too", with_(text(), lambda r: r.inputs[0].contents.fp32_contents.append(1.0)),
     C.INVALID_ARGUMENT, "fp32_contents"),
    ("INT32 in int64_contents", with_(pb.ModelInferRequest(model_name="a"), lambda r: r.inputs.add(
        name="input_ids", datatype="INT32", shape=[1]).contents.int64_contents.append(5)), C.INVALID_ARGUMENT, None),
    ("no contents at all", with_(pb.ModelInferRequest(model_name="a"), lambda r: r.inputs.add(
        name="text", datatype="BYTES", shape=[1])), C.INVALID_ARGUMENT, "values"),
    ("typed ids and mask lengths differ", with_(pb.ModelInferRequest(model_name="a"), lambda r: (
        r.inputs.add(name="input_ids", datatype="INT64", shape=[1, 4]).contents.int64_contents.extend(TOKENS),
        r.inputs.add(name="attention_mask", datatype="INT64", shape=[1, 4]).contents.int64_contents.extend([1, 1]))),
     C.INVALID_ARGUMENT, "values"),
    # values
    ("mask value 2", ids([TOKENS], [[1, 1, 2, 1]]), C.INVALID_ARGUMENT, "attention_mask"),
    ("mask value -5", ids([TOKENS], [[1, -5, 1, 1]]), C.INVALID_ARGUMENT, "attention_mask"),
    ("mask value 1e18", ids([TOKENS], [[1, 10**18, 1, 1]]), C.INVALID_ARGUMENT, "attention_mask"),
    ("all-zero mask", ids([TOKENS], [[0, 0, 0, 0]]), C.INVALID_ARGUMENT, "all zeros"),
    ("second mask row all zero", ids([TOKENS, TOKENS], [[1, 1, 1, 1], [0, 0, 0, 0]]), C.INVALID_ARGUMENT, "row 1"),
    ("id -1", ids([[2, -1, 3]]), C.INVALID_ARGUMENT, "input_ids"),
    (f"id {VOCAB} (= vocabulary size)", ids([[2, VOCAB, 3]]), C.INVALID_ARGUMENT, f"{VOCAB}"),
    ("id 2**62", ids([[2, 2**62, 3]]), C.INVALID_ARGUMENT, "input_ids"),
    ("typed id out of vocabulary", with_(pb.ModelInferRequest(model_name="a"), lambda r: (
        r.inputs.add(name="input_ids", datatype="INT64", shape=[1, 2]).contents.int64_contents.extend([2, 10**6]),
        r.inputs.add(name="attention_mask", datatype="INT64", shape=[1, 2]).contents.int64_contents.extend([1, 1]))),
     C.INVALID_ARGUMENT, "input_ids"),
    # outputs
    ("unknown output", with_(text(), lambda r: r.outputs.add(name="foo")), C.INVALID_ARGUMENT, "foo"),
    ("1 MB output name", with_(text(), lambda r: r.outputs.add(name=LONG)), C.INVALID_ARGUMENT, "chars"),
    ("empty output name", with_(text(), lambda r: r.outputs.add(name="")), C.INVALID_ARGUMENT, "output"),
    ("output named twice", with_(text(), lambda r: (r.outputs.add(name="logits"), r.outputs.add(name="logits"))),
     C.INVALID_ARGUMENT, "twice"),
    ("base has no embeddings output", with_(text(model="b"), lambda r: r.outputs.add(name="embeddings")),
     C.INVALID_ARGUMENT, "embeddings"),
    # bytes that do not parse
    ("garbage bytes", b"\xff\xff\xff\xff", C.INVALID_ARGUMENT, "parse"),
    ("truncated message", VALID[:-3], C.INVALID_ARGUMENT, "parse"),
    ("wire type 7", b"\x0f\x01" + VALID, C.INVALID_ARGUMENT, "parse"),
    ("group that never ends", b"\x0b" + VALID, C.INVALID_ARGUMENT, "parse"),
    ("length prefix past the end", b"\x0a\xff\xff\xff\x0f" + b"a", C.INVALID_ARGUMENT, "parse"),
    ("field number 0", b"\x00\x01" + VALID, C.INVALID_ARGUMENT, "parse"),
]


def _send(served, payload, timeout=30.0):
    data = payload if isinstance(payload, bytes) else payload.SerializeToString()
    try:
        return C.OK, "", pb.ModelInferResponse.FromString(served["raw"](data, timeout=timeout))
    except grpc.RpcError as e:
        return e.code(), e.details() or "", None


def _assert_valid_answer(served) -> None:
    code, details, resp = _send(served, text())
    assert code == C.OK, details
    got = np.frombuffer(resp.raw_output_contents[0], dtype="<f4")
    rtol, atol = tol(torch.float32)
    np.testing.assert_allclose(got, served["expected"], rtol=rtol, atol=atol)


def test_corpus_is_large_and_named_uniquely():
    labels = [c[0] for c in CORPUS]
    assert len(labels) >= 80 and len(set(labels)) == len(labels)


@pytest.mark.parametrize("label, payload, code, needle", CORPUS, ids=[c[0] for c in CORPUS])
def test_malformed_request(served, label, payload, code, needle):
    got, details, _ = _send(served, payload)
    assert got == code, f"{label}: {got} {details[:300]}"
    assert len(details) <= MAX_MESSAGE, f"{label}: a {len(details)}-character message"
    assert "Traceback" not in details and "/" not in details.replace("../a", ""), details
    if needle is not None:
        assert needle in details, f"{label}: {details[:300]}"
    _assert_valid_answer(served)


def test_valid_requests_in_every_form(served):
    """The forms the corpus bends: typed text, raw text, [batch, 1] text, and token ids (raw and
    typed) for the adapter; all agree with the in-process answer."""
    tok = served["service"].converters["b"]._preprocessor()([VALID_TEXT.decode()])
    input_ids, mask = (t.numpy() for t in tok)
    forms = {
        "typed": text(),
        "column": text(shape=[1, 1]),
        "raw": with_(pb.ModelInferRequest(model_name="a"), lambda r: (
            r.inputs.add(name="text", datatype="BYTES", shape=[1]), r.raw_input_contents.append(raw_bytes([VALID_TEXT])))),
        "ids raw": ids(input_ids, mask),
        "ids typed": with_(pb.ModelInferRequest(model_name="a"), lambda r: (
            r.inputs.add(name="input_ids", datatype="INT64", shape=list(input_ids.shape)).contents.int64_contents
            .extend(input_ids.ravel().tolist()),
            r.inputs.add(name="attention_mask", datatype="INT64", shape=list(mask.shape)).contents.int64_contents
            .extend(mask.ravel().tolist()))),
        "version": text(model_version=served["service"].describe("a").versions[0]),
        "32 rows": text([VALID_TEXT] * 32),
    }
    rtol, atol = tol(torch.float32)
    for label, req in forms.items():
        code, details, resp = _send(served, req)
        assert code == C.OK, f"{label}: {details}"
        got = np.frombuffer(resp.raw_output_contents[0], dtype="<f4").reshape(list(resp.outputs[0].shape))
        for row in got:
            np.testing.assert_allclose(row, served["expected"], rtol=rtol, atol=atol, err_msg=label)


def test_internal_errors_carry_an_id_and_no_detail(served, monkeypatch, caplog):
    def boom(inputs):
        raise RuntimeError("/srv/secret/path exploded")

    monkeypatch.setattr(served["service"].converters["b"], "convert", boom)
    with caplog.at_level("ERROR", logger="wara.serve"):
        code, details, _ = _send(served, text())
    assert code == C.INTERNAL
    assert "secret" not in details and "RuntimeError" not in details and "Traceback" not in details
    error_id = details.split("error id ")[1][:12]
    assert len(error_id) == 12 and int(error_id, 16) >= 0
    assert any(error_id in r.getMessage() and r.exc_info for r in caplog.records)
    monkeypatch.undo()
    _assert_valid_answer(served)


def test_stream_refuses_undecodable_messages(served):
    stream = served["channel"].stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                             request_serializer=lambda b: b,
                                             response_deserializer=pb.ModelStreamInferResponse.FromString)
    replies = list(stream(iter([b"\xff\xff\xff", text(model=LONG).SerializeToString(), VALID]), timeout=30))
    assert replies[0].error_message.startswith("INVALID_ARGUMENT")
    assert replies[1].error_message.startswith("NOT_FOUND") and len(replies[1].error_message) < MAX_MESSAGE
    assert not replies[2].error_message and replies[2].infer_response.model_name == "a"


def test_other_rpcs_clip_names(served):
    stub = served["stub"]
    for call, req, code in [(stub.ModelMetadata, pb.ModelMetadataRequest(name=LONG), C.NOT_FOUND),
                            (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name=LONG), C.INVALID_ARGUMENT),
                            (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name=LONG), C.NOT_FOUND)]:
        with pytest.raises(grpc.RpcError) as e:
            call(req, timeout=10)
        assert e.value.code() == code and len(e.value.details()) < 200
    assert stub.ModelReady(pb.ModelReadyRequest(name=LONG), timeout=10).ready is False


def test_clip():
    assert clip("abc") == "'abc'"
    assert clip("x" * 1000).endswith("(1000 chars)") and len(clip("x" * 1000)) < 100


def test_bit_flipped_requests_never_internal(served):
    """1,000 valid requests (text and token ids, typed and raw) with 1-3 bits flipped, sent as
    raw bytes: each is refused cleanly or answered."""
    rng = random.Random(11)
    tok = served["service"].converters["b"]._preprocessor()([VALID_TEXT.decode()])
    seeds = [VALID, text([VALID_TEXT] * 3, model="b").SerializeToString(), ids(*(t.numpy() for t in tok)).SerializeToString(),
             with_(text(), lambda r: r.outputs.add(name="logits")).SerializeToString()]
    codes: Counter = Counter()
    for _ in range(1000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        code, details, _ = _send(served, bytes(data))
        codes[code.name] += 1
        assert code not in (C.INTERNAL, C.UNKNOWN), f"{code}: {details[:300]}"
    print(f"bit flips: {dict(codes)}")
    assert codes["INVALID_ARGUMENT"] > 0
    _assert_valid_answer(served)


# --- hypothesis fuzz -----------------------------------------------------------------------
def _fuzz(served):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    names = st.sampled_from(["text", "input_ids", "attention_mask", "", "image_bytes", "x" * 100]) | st.text(max_size=8)
    datatypes = st.sampled_from(["BYTES", "INT64", "INT32", "FP32", "FP16", "FP64", "BOOL", "UINT8", "INT8",
                                 "UINT64", "", "STRING"]) | st.text(max_size=6)
    dims = st.sampled_from([-1, 0, 1, 2, 3, 4, 31, 32, 33, 64, 65, 2**31, 2**62, 2**63 - 1, -2**63])
    shapes = st.lists(dims, max_size=4) | st.lists(st.integers(1, 4), min_size=1, max_size=3)
    ints = st.sampled_from([0, 1, 2, 3, 30, 101, 102, -1, 2, 10**18]) | st.integers(-2**63, 2**63 - 1)
    texts = st.sampled_from([VALID_TEXT, b"", b"\xff", b"good " * 200]) | st.binary(max_size=16)

    @st.composite
    def tensors(draw, raw: bool):
        t = pb.ModelInferRequest.InferInputTensor(name=draw(names), datatype=draw(datatypes), shape=draw(shapes))
        if not raw:
            field = draw(st.sampled_from(["bytes_contents", "int64_contents", "int_contents", "fp32_contents",
                                          "bool_contents", "uint_contents", "uint64_contents", "fp64_contents", None]))
            n = draw(st.integers(0, 6))
            if field == "bytes_contents":
                t.contents.bytes_contents.extend(draw(st.lists(texts, min_size=n, max_size=n)))
            elif field in ("int64_contents",):
                t.contents.int64_contents.extend(draw(st.lists(ints, min_size=n, max_size=n)))
            elif field == "int_contents":
                t.contents.int_contents.extend(draw(st.lists(st.integers(-2**31, 2**31 - 1), min_size=n, max_size=n)))
            elif field in ("uint_contents",):
                t.contents.uint_contents.extend(draw(st.lists(st.integers(0, 2**32 - 1), min_size=n, max_size=n)))
            elif field == "uint64_contents":
                t.contents.uint64_contents.extend(draw(st.lists(st.integers(0, 2**64 - 1), min_size=n, max_size=n)))
            elif field == "fp32_contents":
                t.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), min_size=n, max_size=n)))
            elif field == "fp64_contents":
                t.contents.fp64_contents.extend(draw(st.lists(st.floats(), min_size=n, max_size=n)))
            elif field == "bool_contents":
                t.contents.bool_contents.extend(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
        return t

    @st.composite
    def raw_content(draw):
        kind = draw(st.sampled_from(["bytes", "ids", "mask", "binary"]))
        if kind == "bytes":
            return raw_bytes(draw(st.lists(texts, max_size=4)))
        if kind == "binary":
            return draw(st.binary(max_size=64))
        values = draw(st.lists(ints if kind == "ids" else st.sampled_from([0, 1, 2, -5]), min_size=1, max_size=12))
        return np.asarray(values, dtype="<i8").tobytes()

    @st.composite
    def near_valid(draw):
        """Token-id requests close to valid: random lengths, ids, masks and batch sizes."""
        rows, length = draw(st.integers(1, 3)), draw(st.integers(1, 8))
        ids_ = draw(st.lists(st.sampled_from([0, 2, 3, 30, 50, 101, 102, -1]), min_size=rows * length,
                             max_size=rows * length))
        mask = draw(st.lists(st.sampled_from([0, 1, 1, 1, 2]), min_size=rows * length, max_size=rows * length))
        return ids(np.reshape(ids_, (rows, length)), np.reshape(mask, (rows, length)),
                   model=draw(st.sampled_from(["a", "b"])))

    @st.composite
    def requests(draw):
        if draw(st.integers(0, 3)) == 0:
            return draw(near_valid())
        raw = draw(st.booleans())
        req = pb.ModelInferRequest(model_name=draw(st.sampled_from(["a", "b", "", "nope"]) | st.text(max_size=8)),
                                   model_version=draw(st.sampled_from(["", "", "1", "2"]) | st.text(max_size=4)),
                                   id=draw(st.text(max_size=4)))
        if draw(st.integers(0, 2)) == 0:  # a valid text input to bend
            req.MergeFrom(text(draw(st.lists(texts, min_size=1, max_size=3)), model=req.model_name or "a"))
        for t in draw(st.lists(tensors(raw), max_size=3)):
            req.inputs.append(t)
        if raw:
            n = draw(st.sampled_from([len(req.inputs), len(req.inputs), 0, len(req.inputs) + 1]))
            req.raw_input_contents.extend(draw(st.lists(raw_content(), min_size=n, max_size=n)))
        for name in draw(st.lists(st.sampled_from(["logits", "labels", "embeddings", "", "x"]), max_size=2)):
            req.outputs.add(name=name)
        return req

    seen: Counter = Counter()

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(requests())
    def run(req):
        code, details, _ = _send(served, req, timeout=30.0)
        seen[code.name] += 1
        assert code not in (C.INTERNAL, C.UNKNOWN), f"{code}: {details[:300]}\n{req}"[:3000]

    run()
    return seen


@pytest.mark.slow
def test_fuzzed_requests_never_internal(served):
    t0 = time.perf_counter()
    seen = _fuzz(served)
    print(f"fuzz: {sum(seen.values())} examples in {time.perf_counter() - t0:.1f}s: {dict(seen)}")
    assert served["stub"].ServerLive(pb.ServerLiveRequest(), timeout=10).live
    _assert_valid_answer(served)


def test_truncated_texts_are_stated_in_the_response(served):
    """A text longer than the model's positions is cut, and the response says which rows were
    cut and to how many tokens; a short one is not marked."""
    long_text = b" ".join([b"good"] * (3 * MAX_LEN))
    resp = served["stub"].ModelInfer(text((VALID_TEXT, long_text)))
    assert resp.parameters["truncated_rows"].string_param == "1"
    assert resp.parameters["max_text_length"].int64_param == MAX_LEN
    assert "truncated_rows" not in served["stub"].ModelInfer(text()).parameters


def test_a_big_request_does_not_hold_up_a_small_one(served):
    """16 texts of 64 KB (1 MiB, within the limits; tokenized on a worker thread) sent first, a
    one-word text right behind it: the small one is answered long before the big one."""
    import threading

    big = text([(b"really good movie " * 4000)[:65000]] * 16)
    times = {}

    def send_big():
        t0 = time.perf_counter()
        served["stub"].ModelInfer(big, timeout=60)
        times["big"] = time.perf_counter() - t0

    thread = threading.Thread(target=send_big)
    thread.start()
    time.sleep(0.005)
    t0 = time.perf_counter()
    served["stub"].ModelInfer(text(), timeout=60)
    times["small"] = time.perf_counter() - t0
    thread.join()
    print(f"\nhead of line: big {times['big'] * 1e3:.0f} ms, small sent behind it {times['small'] * 1e3:.0f} ms")
    assert times["small"] < times["big"] / 4, times
