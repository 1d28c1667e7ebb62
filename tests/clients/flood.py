"""A flooding tenant: keeps CONCURRENCY ModelInfer requests in flight for SECONDS, sending each
refused or answered one again at once. Prints the count of each status code, and `sent`.

    python flood.py PORT TOKEN MODEL CONCURRENCY SECONDS [CONNECTIONS]
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from runtime.kserve import inference_pb2 as pb  # noqa: E402
from runtime.kserve import inference_pb2_grpc as pb_grpc  # noqa: E402


async def main(port: int, token: str, model: str, concurrency: int, seconds: float, connections: int = 1) -> None:
    counts: Counter[str] = Counter()
    await asyncio.gather(*(flood(port, token, model, concurrency // connections, seconds, counts)
                           for _ in range(connections)))
    print(" ".join(f"{k}={v}" for k, v in sorted(counts.items())))


async def flood(port: int, token: str, model: str, concurrency: int, seconds: float, counts: Counter) -> None:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"the food was awful")
    md = (("authorization", f"Bearer {token}"),)
    options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        # One call first: the server's SETTINGS (its stream limit) arrive with the connection,
        # so the flood queues on this side instead of being refused as excess streams.
        await stub.ServerLive(pb.ServerLiveRequest(), timeout=30)
        end = time.monotonic() + seconds

        async def worker() -> None:
            while time.monotonic() < end:
                counts["sent"] += 1
                try:
                    await stub.ModelInfer(req, metadata=md, timeout=60)
                    counts["OK"] += 1
                except grpc.aio.AioRpcError as e:
                    counts[e.code().name] += 1
                    if e.code() not in (grpc.StatusCode.RESOURCE_EXHAUSTED,) and counts[e.code().name] == 1:
                        print(e.details(), e.debug_error_string(), file=sys.stderr)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


if __name__ == "__main__":
    port, token, model, concurrency, seconds = sys.argv[1:6]
    connections = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    asyncio.run(main(int(port), token, model, int(concurrency), float(seconds), connections))
