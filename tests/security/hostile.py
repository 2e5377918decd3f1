"""Hostile requests for any gRPC method, built from its request message's descriptor (hypothesis strategies), and
the checks every answer must pass: a clean status code, and nothing stored changed.

A request is drawn field by field. Strings are drawn from what attacks an object store and a file system (keys with
`../`, absolute paths, empty and huge strings, control characters, other buckets), mixed with the keys of the
fixture blobs the test stored (so references resolve to objects of the wrong kind, shape or dtype) and random text;
numbers from the edges of their type (huge counts, negative, NaN, infinity); enums from known and unknown values;
`ObjectRef` / `ArrayRef` get fixture blobs, missing keys and wrong hashes; repeated fields are empty, short or long.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import grpc
from google.protobuf import descriptor as d
from google.protobuf.message import Message
from hypothesis import strategies as st

CLEAN_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.DATA_LOSS,  # a reference whose sha256 is not its content's: the caller's claim is refused
    }
)
"""What a hostile request may get back; never INTERNAL, UNKNOWN, UNAVAILABLE (no dependency is down here) or a
deadline (a hang)."""

MAX_DEPTH = 4
HUGE = 200_000
"""Length of the huge strings: a key far over S3's 1024 bytes, well under the 4 MiB message limit."""

TRAVERSAL_KEYS = [
    "../escape",
    "../../etc/passwd",
    "/etc/passwd",
    "/abs/key.npy",
    "a/../../b",
    "fixtures/../fixtures/garbage.bin",
    "./fixtures/garbage.bin",
    "fixtures//garbage.bin",
    "fixtures/garbage.bin/",
    "..",
    ".",
    "~/key",
    "C:\\windows\\key",
    "fixtures\\..\\x",
    "%2e%2e/escape",
    "key\x00.npy",
    "key\nwith-newline",
    "ключ/файл",
    " ",
    "x" * 1025,
    "y" * HUGE,
]
BUCKETS = ["", "other-bucket", "../bucket", "UPPER", "a", "x" * 300, "a2v-test", "bucket/with/slash"]


PLAUSIBLE = [
    (("analysis", "manifest"), ("fixtures/analysis", "/result.json")),
    (("dataset",), ("arrays.npz",)),
    (("pca",), ("pca.npz",)),
    (("normaliz",), ("normalization.npz",)),
    (("audio", "wav"), ("speech.wav",)),
    (("video", "segment"), (".mp4",)),
    (("features",), ("features.npy",)),
    (("activity",), ("activity.npy",)),
    (("valid",), ("texture_valid", "face_valid", "activity.npy")),
    (("jaw",), ("jaw", "shapes.npy")),
    (("mouth", "shape", "coefficient"), ("mouth_shapes", "shapes.npy")),
    (("texture", "crop", "frame", "mask", "image"), ("texture/", "crops", "frames.zip")),
    (("landmark",), ("landmarks",)),
    (("pose",), ("pose",)),
    (("timestamp",), ("timestamps",)),
    (("mapping", "retim", "index", "indices"), ("retiming.npy", "int8.npy")),
    (("confidence", "weight"), ("track.npy",)),
]
"""Which fixtures a reference field of a given name gets in a plausible request (first match)."""


def chance(k: int, n: int) -> st.SearchStrategy[bool]:
    """True k times in n. (Hypothesis draws small integers and first choices more often than the rest, which
    left most requests empty or wild; a residue of a wide integer is near uniform.)"""
    return st.integers(0, 2**20).map(lambda value: value % n < k)


def int_bounds(field: d.FieldDescriptor) -> tuple[int, int]:
    kind = field.type
    if kind in (d.FieldDescriptor.TYPE_INT32, d.FieldDescriptor.TYPE_SINT32, d.FieldDescriptor.TYPE_SFIXED32):
        return -(2**31), 2**31 - 1
    if kind in (d.FieldDescriptor.TYPE_UINT32, d.FieldDescriptor.TYPE_FIXED32):
        return 0, 2**32 - 1
    if kind in (d.FieldDescriptor.TYPE_UINT64, d.FieldDescriptor.TYPE_FIXED64):
        return 0, 2**64 - 1
    return -(2**63), 2**63 - 1


def integers(field: d.FieldDescriptor) -> st.SearchStrategy[int]:
    low, high = int_bounds(field)
    edges = [v for v in (0, 1, 2, 3, -1, 1000, 10**6, 10**9, 2**31 - 1, -(2**31), 2**53, 2**63 - 1, low, high)]
    edges = sorted({v for v in edges if low <= v <= high})
    return st.one_of(st.sampled_from(edges), st.integers(low, high), st.integers(max(low, -5), min(high, 300)))


def floats(field: d.FieldDescriptor) -> st.SearchStrategy[float]:
    width = 32 if field.type == d.FieldDescriptor.TYPE_FLOAT else 64
    edges = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-300, 1e300, -1e300, math.inf, -math.inf, math.nan, 30.0, 2.0**40]
    if width == 32:
        edges = [v for v in edges if not math.isfinite(v) or abs(v) < 3e38]
    return st.one_of(st.sampled_from(edges), st.floats(width=width), st.floats(-10, 1000, width=width))


class Hostile:
    """Strategies for the hostile messages of one test module: `keys` are the fixture blobs it stored."""

    def __init__(
        self, bucket: str, keys: Iterable[str], shas: Mapping[str, str], extra_text: Iterable[str] = ()
    ) -> None:
        self.bucket = bucket
        self.job_ids = list(extra_text)
        self.keys = sorted(keys)
        self.shas = dict(shas)
        prefixes = sorted({key.rsplit("/", 1)[0] for key in self.keys})
        self.key_like = st.one_of(
            st.sampled_from(self.keys),
            st.sampled_from(TRAVERSAL_KEYS),
            st.sampled_from([f"{k}.missing" for k in self.keys] + ["missing/nothing.npy", "jobs/none/job.json"]),
            st.sampled_from(prefixes),
            st.from_regex(r"[a-z0-9_]{1,12}(/[a-z0-9_.]{1,12}){0,3}", fullmatch=True),
        )
        self.text = st.one_of(
            self.key_like,
            st.sampled_from(
                [
                    *extra_text,
                    "",
                    "obama",
                    "hostile",
                    "e2e",
                    "nobody",
                    "a" * 65,
                    "UPPER",
                    "x" * HUGE,
                    "é",
                    "\x00",
                    "0" * 20,
                ]
            ),
            st.text(max_size=24),
            st.sampled_from(BUCKETS),
        )
        self.sha = st.one_of(
            st.just(""),
            st.sampled_from(sorted(self.shas.values())),
            st.sampled_from(["0" * 64, "f" * 64, "not-hex", "A" * 64, "0" * 63, "0" * 65]),
            st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
        )

    # -- plausible values: a request that gets past the first checks, with hostile parts ------------

    def plausible_key(self, field_name: str) -> st.SearchStrategy[str]:
        """A fixture of the kind a field of this name names (its content may still lie)."""
        name = field_name.lower()
        for words, patterns in PLAUSIBLE:
            if any(word in name for word in words):
                matches = [key for key in self.keys if any(pattern in key for pattern in patterns)]
                if matches:
                    return st.sampled_from(matches)
        return st.sampled_from(self.keys)

    # -- per field ---------------------------------------------------------------------------------

    def string(self, field: d.FieldDescriptor) -> st.SearchStrategy[str]:
        name = field.name
        if name == "bucket":
            return st.one_of(st.just(self.bucket), st.sampled_from(BUCKETS), st.text(max_size=12))
        if name == "sha256":
            return self.sha
        if name == "key" or name.endswith(("_key", "_prefix")):
            return st.one_of(self.key_like, st.just(""), st.just("x" * HUGE))
        return self.text

    def scalar(self, field: d.FieldDescriptor) -> st.SearchStrategy:
        kind = field.type
        if kind == d.FieldDescriptor.TYPE_STRING:
            return self.string(field)
        if kind == d.FieldDescriptor.TYPE_BYTES:
            return st.one_of(st.binary(max_size=64), st.just(b"\x00" * 10_000))
        if kind == d.FieldDescriptor.TYPE_BOOL:
            return st.booleans()
        if kind in (d.FieldDescriptor.TYPE_FLOAT, d.FieldDescriptor.TYPE_DOUBLE):
            return floats(field)
        if kind == d.FieldDescriptor.TYPE_ENUM:
            known = [value.number for value in field.enum_type.values]
            return st.one_of(st.sampled_from(known), st.sampled_from([-1, 99, 2**31 - 1, -(2**31)]))
        return integers(field)

    # -- messages ----------------------------------------------------------------------------------

    def object_ref(self, message_class: type[Message], field_name: str, plausible: bool) -> st.SearchStrategy[Message]:
        @st.composite
        def draw(draw_) -> Message:
            ref = message_class()
            if plausible and draw_(chance(5, 6)):
                ref.key = key = draw_(self.plausible_key(field_name))
                ref.sha256 = self.shas.get(key, "") if draw_(chance(1, 2)) else ""
                return ref
            key = draw_(st.one_of(st.sampled_from(self.keys), self.key_like, st.just("")))
            ref.key = key
            choice = draw_(st.integers(0, 5))
            if choice == 0:
                ref.sha256 = self.shas.get(key, "")
            elif choice == 1:
                ref.sha256 = draw_(self.sha)
            if draw_(st.integers(0, 4)) == 0:
                ref.bucket = draw_(st.sampled_from([self.bucket, *BUCKETS]))
            if draw_(st.booleans()):
                ref.size_bytes = draw_(st.sampled_from([0, 1, 2**62, 10**6]))
            if draw_(st.integers(0, 3)) == 0:
                ref.content_type = draw_(st.sampled_from(["", "video/mp4", "audio/wav", "application/x-npy", "\x00"]))
            return ref

        return draw()

    def mutated(self, base: Message) -> st.SearchStrategy[Message]:
        """`base` (a request that works) with one or two of its fields, at any depth, made hostile."""

        @st.composite
        def draw(draw_) -> Message:
            message = type(base)()
            message.CopyFrom(base)
            for _ in range(draw_(st.integers(1, 2))):
                self._mutate(draw_, message, 0)
            return message

        return draw()

    def _mutate(self, draw_: Callable, message: Message, depth: int) -> None:
        fields = list(message.DESCRIPTOR.fields)
        if not fields:
            return
        field = draw_(st.sampled_from(fields))
        inner = field.type == d.FieldDescriptor.TYPE_MESSAGE and not field.is_repeated
        if inner and depth < MAX_DEPTH and message.HasField(field.name) and draw_(chance(2, 3)):
            self._mutate(draw_, getattr(message, field.name), depth + 1)
            return
        message.ClearField(field.name)
        self._fill(draw_, message, field, depth)

    def request(self, message_class: type[Message]) -> st.SearchStrategy[Message]:
        """A request: plausible (references to fixtures of the right kind, sane rates
        and numbers, with a few hostile fields), one in four wild."""
        choice = chance(3, 4)
        return choice.flatmap(lambda plausible: self.message(message_class, plausible=plausible))

    def message(
        self, message_class: type[Message], depth: int = 0, *, field_name: str = "", plausible: bool = False
    ) -> st.SearchStrategy[Message]:
        """Any message of `message_class`, hostile in each field it sets."""
        descriptor = message_class.DESCRIPTOR
        if descriptor.full_name == "audio2video.common.v1.ObjectRef":
            return self.object_ref(message_class, field_name, plausible)
        if descriptor.full_name == "audio2video.common.v1.FrameRate" and plausible:
            sane = st.sampled_from([(30, 1), (30000, 1001), (25, 1)])
            return sane.map(lambda rate: message_class(numerator=rate[0], denominator=rate[1]))
        if descriptor.full_name == "audio2video.common.v1.FrameRange" and plausible:
            sane = st.tuples(st.integers(0, 11), st.integers(1, 12))
            return sane.map(lambda r: message_class(start=r[0], stop=r[0] + r[1]))

        @st.composite
        def draw(draw_) -> Message:
            message = message_class()
            for field in descriptor.fields:
                if depth >= MAX_DEPTH and field.type == d.FieldDescriptor.TYPE_MESSAGE:
                    continue
                if plausible and _is_reference(field):
                    pass  # every reference, frame range and frame rate is set
                elif plausible and field.type == d.FieldDescriptor.TYPE_MESSAGE and not field.is_repeated:
                    if "option" in field.name and not draw_(chance(1, 2)):  # options: half at their defaults
                        continue
                elif not draw_(chance(5, 6) if plausible else chance(2, 3)):  # some fields stay unset
                    continue
                self._fill(draw_, message, field, depth, plausible and draw_(chance(4, 5)))
            return message

        return draw()

    def sane(self, field: d.FieldDescriptor) -> st.SearchStrategy:
        """A value a careful caller might send."""
        kind = field.type
        if kind == d.FieldDescriptor.TYPE_STRING:
            if "speaker" in field.name:
                return st.sampled_from(["hostile", "obama"])
            if field.name == "job_id" and self.job_ids:
                return st.sampled_from(self.job_ids)
            return st.just("")
        if kind == d.FieldDescriptor.TYPE_BOOL:
            return st.booleans()
        if kind in (d.FieldDescriptor.TYPE_FLOAT, d.FieldDescriptor.TYPE_DOUBLE):
            return st.sampled_from([0.0, 0.0, 0.5])
        if kind == d.FieldDescriptor.TYPE_ENUM:
            return st.sampled_from([value.number for value in field.enum_type.values])
        if kind == d.FieldDescriptor.TYPE_BYTES:
            return st.just(b"")
        if field.name == "version":
            return st.sampled_from([0, 1])
        return st.integers(1, 12)

    def _fill(
        self, draw_: Callable, message: Message, field: d.FieldDescriptor, depth: int, plausible: bool = False
    ) -> None:
        target = getattr(message, field.name)
        if plausible and field.type != d.FieldDescriptor.TYPE_MESSAGE:
            values = self.sane(field)
            if field.is_repeated:
                target.extend(draw_(st.lists(values, max_size=3)))
            else:
                setattr(message, field.name, draw_(values))
            return
        if field.type == d.FieldDescriptor.TYPE_MESSAGE:
            sub_class = type(target) if not _is_repeated(field) else None
            if field.message_type.GetOptions().map_entry:
                key_field, value_field = (
                    field.message_type.fields_by_name["key"],
                    field.message_type.fields_by_name["value"],
                )
                for _ in range(draw_(st.integers(0, 3))):
                    map_key = draw_(self.scalar(key_field))
                    if value_field.type == d.FieldDescriptor.TYPE_MESSAGE:
                        value_class = _message_class(message, field, value_field)
                        target[map_key].CopyFrom(draw_(self.message(value_class, depth + 1, field_name=field.name)))
                    else:
                        target[map_key] = draw_(self.scalar(value_field))
                return
            if _is_repeated(field):
                item_class = type(target.add())
                del target[:]
                count = draw_(st.sampled_from([1, 2, 3] if plausible else [0, 1, 2, 3, 40]))
                item = self.message(item_class, depth + 1, field_name=field.name, plausible=plausible)
                items = draw_(st.lists(item, min_size=min(count, 3), max_size=3))
                if count == 40 and items:
                    items = (items * 40)[:40]
                target.extend(items)
                return
            sub = self.message(sub_class, depth + 1, field_name=field.name, plausible=plausible)
            getattr(message, field.name).CopyFrom(draw_(sub))
            return
        values = self.scalar(field)
        if _is_repeated(field):
            count = draw_(st.sampled_from([0, 1, 2, 3, 5000]))
            items = draw_(st.lists(values, min_size=min(count, 1), max_size=4))
            if count == 5000 and items:
                items = (items * 5000)[:5000]
            target.extend(items)
            return
        setattr(message, field.name, draw_(values))


def _is_reference(field: d.FieldDescriptor) -> bool:
    return field.type == d.FieldDescriptor.TYPE_MESSAGE and field.message_type.full_name in (
        "audio2video.common.v1.ObjectRef",
        "audio2video.common.v1.ArrayRef",
        "audio2video.common.v1.FrameRange",
        "audio2video.common.v1.FrameRate",
    )


def _is_repeated(field: d.FieldDescriptor) -> bool:
    return field.is_repeated


def _message_class(message: Message, field: d.FieldDescriptor, value_field: d.FieldDescriptor) -> type[Message]:
    """The Python class of a map field's message values."""
    probe = type(message)()
    entry = getattr(probe, field.name)
    return type(entry["probe"])


# -- calling and checking ----------------------------------------------------------------------------


def call(channel: grpc.Channel, service: str, method: d.MethodDescriptor, request: Message, timeout: float):
    """Make the call (a stream read to its end); the RpcError it ended with, or None."""
    path = f"/{service}/{method.name}"
    response_class = _response_class(method)
    if method.server_streaming:
        rpc = channel.unary_stream(path, request_serializer=_serialize, response_deserializer=response_class.FromString)
    else:
        rpc = channel.unary_unary(path, request_serializer=_serialize, response_deserializer=response_class.FromString)
    try:
        result = rpc(request, timeout=timeout)
        if method.server_streaming:
            for _ in result:
                pass
    except grpc.RpcError as exc:
        return exc
    return None


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


_CLASSES: dict[str, type[Message]] = {}


def register_messages(*modules) -> None:
    """Make the message classes of generated `_pb2` modules known (`message_class`; `call` decodes responses)."""
    for module in modules:
        for name in module.DESCRIPTOR.message_types_by_name:
            cls = getattr(module, name)
            _CLASSES[cls.DESCRIPTOR.full_name] = cls


def message_class(descriptor: d.Descriptor) -> type[Message]:
    """The generated class of a registered message type."""
    return _CLASSES[descriptor.full_name]


def _response_class(method: d.MethodDescriptor) -> type[Message]:
    return message_class(method.output_type)


def snapshot(client, buckets: Iterable[str]) -> dict[tuple[str, str], str]:
    """Every object of `buckets` and its ETag (a changed or removed object shows here)."""
    objects = {}
    for bucket in buckets:
        for item in client.list_objects(bucket, recursive=True):
            objects[(bucket, item.object_name)] = item.etag
    return objects


def changed(before: Mapping, after: Mapping) -> list[str]:
    """The objects of `before` that are gone or different in `after`."""
    return [f"{bucket}/{key}" for (bucket, key), etag in before.items() if after.get((bucket, key)) != etag]
