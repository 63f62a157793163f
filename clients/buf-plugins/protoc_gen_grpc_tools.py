"""A protoc plugin for `buf generate` that runs grpcio-tools' own protoc generators.

grpcio-tools builds the Python, pyi and gRPC Python generators into its protoc instead of
shipping protoc-gen-* executables, so buf cannot call them as plugins, and buf's
`protoc_builtin` needs a protoc binary that also lacks the gRPC generator. This plugin takes
buf's CodeGeneratorRequest, hands the same descriptors to grpcio-tools' protoc through
--descriptor_set_in and answers with the files that protoc wrote.

Parameters (buf.gen.yaml `opt`): `generator=python|pyi|grpc_python` picks the generator;
every other option is passed on to it.

The output is byte for byte what tools/genproto.py writes with the same grpcio-tools: buf fills
in every field's json_name, protoc records it only when the .proto sets one, and the Python
generator embeds the descriptor, so default json_names are cleared before generating.
"""

from __future__ import annotations

import pathlib
import sys
import tempfile
from collections.abc import Iterable

from google.protobuf import descriptor_pb2
from google.protobuf.compiler import plugin_pb2
from grpc_tools import protoc  # type: ignore[import-untyped]

GENERATORS = ("python", "pyi", "grpc_python")


def default_json_name(name: str) -> str:
    """protoc's ToJsonName: drop underscores, upper-case the letter after each."""
    out: list[str] = []
    upper_next = False
    for char in name:
        if char == "_":
            upper_next = True
        elif upper_next:
            out.append(char.upper())
            upper_next = False
        else:
            out.append(char)
    return "".join(out)


def clear_default_json_names(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    for message in messages:
        for field in [*message.field, *message.extension]:
            if field.json_name == default_json_name(field.name):
                field.ClearField("json_name")
        clear_default_json_names(message.nested_type)


def generate(request: plugin_pb2.CodeGeneratorRequest) -> plugin_pb2.CodeGeneratorResponse:
    response = plugin_pb2.CodeGeneratorResponse(
        supported_features=plugin_pb2.CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL
    )
    options = [o for o in request.parameter.split(",") if o]
    chosen = [o.partition("=")[2] for o in options if o.startswith("generator=")]
    passed_on = [o for o in options if not o.startswith("generator=")]
    if len(chosen) != 1 or chosen[0] not in GENERATORS:
        response.error = f"set exactly one opt generator=<{'|'.join(GENERATORS)}>"
        return response
    files = []
    for proto in request.proto_file:
        copy = descriptor_pb2.FileDescriptorProto()
        copy.CopyFrom(proto)
        clear_default_json_names(copy.message_type)
        for field in copy.extension:
            if field.json_name == default_json_name(field.name):
                field.ClearField("json_name")
        files.append(copy)
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        descriptors = root / "descriptors.binpb"
        out = root / "out"
        out.mkdir()
        descriptors.write_bytes(descriptor_pb2.FileDescriptorSet(file=files).SerializeToString())
        prefix = ",".join(passed_on) + ":" if passed_on else ""
        args = [
            "protoc",
            f"--descriptor_set_in={descriptors}",
            f"--{chosen[0]}_out={prefix}{out}",
            *request.file_to_generate,
        ]
        if protoc.main(args) != 0:
            response.error = "grpcio-tools protoc failed: " + " ".join(args)
            return response
        for path in sorted(p for p in out.rglob("*") if p.is_file()):
            response.file.add(name=path.relative_to(out).as_posix(), content=path.read_text())
    return response


def main() -> None:
    request = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
    sys.stdout.buffer.write(generate(request).SerializeToString())


if __name__ == "__main__":
    main()
