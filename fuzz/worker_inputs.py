"""Coverage-guided fuzzing of what a worker reads from producers (atheris, libFuzzer's engine).

    python fuzz/worker_inputs.py TARGET [libFuzzer options]      # or: make fuzz FUZZ_SECONDS=300

Targets:
    chunk      a chunk after a few real ones: the Assembler rejects it with ChunkError or applies it, and the
               result still encodes
    envelopes  a stream of chunk-stream entries built from the input: RequestState never raises and its
               outcome always encodes
    capture    the input as a capture file: read_capture and the Assembler's SSE reading never raise anything
               but ChunkError

Anything else raised is a finding: libFuzzer stops and writes the input to fuzz/findings/. Worth keeping as a
plain test in tests/worker/test_fuzz_regressions.py once fixed. Seeds come from fixtures/.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports():
    import orjson

    from streamfold.capture import read_capture
    from streamfold.errors import ChunkError
    from worker.assembler import Assembler
    from worker.request import RequestState

ROOT = Path(__file__).resolve().parent.parent
REAL = [line for path in sorted((ROOT / "fixtures" / "recorded").glob("*.jsonl"))[:4]
        for line in path.read_bytes().splitlines()[:3]]
KINDS = [b"start", b"chunk", b"end", b"error", b"bogus"]


def chunk(data: bytes) -> None:
    assembler = Assembler()
    for line in REAL[:3]:
        assembler.feed(line)
    try:
        assembler.feed(data)
    except ChunkError:
        return
    orjson.dumps(assembler.result())


def envelopes(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    state = RequestState("fuzzed", "1-0", 0.0)
    for number in range(provider.ConsumeIntInRange(0, 8)):
        fields = {b"k": provider.PickValueInList(KINDS),
                  b"att": str(provider.ConsumeIntInRange(0, 2)).encode(),
                  b"ts": provider.ConsumeBytes(provider.ConsumeIntInRange(0, 24)),
                  b"seq": str(provider.ConsumeIntInRange(0, 6)).encode(),
                  b"d": provider.ConsumeBytes(provider.ConsumeIntInRange(0, 2_000))}
        state.feed(f"{number + 2}-0", fields, 0.0)
    outcome = state.outcome(1)
    orjson.loads(outcome.encoded_record)
    orjson.loads(outcome.encoded_usage)


def capture(data: bytes) -> None:
    lines = data.splitlines(keepends=True)
    try:
        for item in read_capture(lines):
            if item.kind == "error":
                item.error_body()
    except ChunkError:  # a printed capture stops at the first object it cannot read
        pass
    assembler = Assembler()
    for line in lines:
        try:
            assembler.feed(line)
        except ChunkError:
            pass
    orjson.dumps(assembler.result())


TARGETS = {"chunk": chunk, "envelopes": envelopes, "capture": capture}


def seed(target: str, corpus: Path) -> None:
    """Write fixture lines as the first inputs, so mutation starts from real chunks."""
    corpus.mkdir(parents=True, exist_ok=True)
    for number, line in enumerate(REAL):
        data = line if target != "capture" else b"data: " + line + b"\n\n"
        (corpus / f"seed-{number}").write_bytes(data)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options]")
    target = sys.argv[1]
    corpus = ROOT / "fuzz" / "corpus" / target
    seed(target, corpus)
    findings = ROOT / "fuzz" / "findings"
    findings.mkdir(exist_ok=True)
    atheris.Setup([sys.argv[0], *sys.argv[2:], f"-artifact_prefix={findings}/{target}-", str(corpus)],
                  TARGETS[target])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
