"""A locus client that no one on the team wrote by hand: its stubs are
generated from proto/ by grpcio-tools at test time.

usage: stream_client.py <generated-stubs-dir> <host:port> <device_id> <user_id>
Streams three batches (the second holds one bad point) and prints each ack as
one JSON line; then asks for the device's latest position and a page of its
track (answers locus builds from encoded locations, not by prost) and prints
each as one JSON line.
"""

import json
import sys
import time

sys.path.insert(0, sys.argv[1])

import grpc  # noqa: E402
from google.protobuf.timestamp_pb2 import Timestamp  # noqa: E402
from locus.v1 import locus_pb2, locus_pb2_grpc  # noqa: E402

target, device_id, user_id = sys.argv[2], sys.argv[3], sys.argv[4]
start = int(time.time()) - 600


def location(i, latitude=19.43):
    return locus_pb2.Location(
        time=Timestamp(seconds=start + i, nanos=500_000_000),
        device_id=device_id,
        user_id=user_id,
        app_source="pshop",
        latitude=latitude + i * 1e-5,
        longitude=-99.13,
        speed=30.5,
        heading=90.0,
        metadata_json=json.dumps({"order": i}),
    )


def batches():
    yield locus_pb2.LocationBatch(batch_id=1, locations=[location(i) for i in range(0, 10)])
    bad = [location(i) for i in range(10, 20)]
    bad[4] = location(14, latitude=123.0)
    yield locus_pb2.LocationBatch(batch_id=2, locations=bad)
    yield locus_pb2.LocationBatch(batch_id=3, locations=[location(i) for i in range(0, 5)])


with grpc.insecure_channel(target) as channel:
    stub = locus_pb2_grpc.IngestStub(channel)
    for ack in stub.StreamLocations(batches(), timeout=30):
        print(json.dumps({
            "batch_id": ack.batch_id,
            "accepted": ack.accepted,
            "duplicates": ack.duplicates,
            "rejected": [{"index": r.index, "reason": r.reason} for r in ack.rejected],
        }), flush=True)
    latest = locus_pb2_grpc.QueryStub(channel).GetLatest(
        locus_pb2.GetLatestRequest(device_ids=[device_id], app_source="pshop"), timeout=30)
    print(json.dumps({
        "latest": [{
            "seconds": l.time.seconds,
            "nanos": l.time.nanos,
            "device_id": l.device_id,
            "user_id": l.user_id,
            "latitude": l.latitude,
            "metadata": json.loads(l.metadata_json),
        } for l in latest.locations],
    }), flush=True)
    track = locus_pb2_grpc.QueryStub(channel).GetTrack(
        locus_pb2.GetTrackRequest(
            device_id=device_id,
            app_source="pshop",
            **{"from": Timestamp(seconds=start)},
            to=Timestamp(seconds=start + 60),
            limit=7,
        ), timeout=30)
    print(json.dumps({
        "track": [{"seconds": l.time.seconds, "order": json.loads(l.metadata_json)["order"]}
                  for l in track.locations],
        "next_cursor": track.next_cursor,
    }), flush=True)
