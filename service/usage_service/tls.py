"""TLS for the gRPC port: a certificate chain and key, and optionally a client CA (mutual TLS)."""

from __future__ import annotations

import pathlib
from typing import Self

import grpc
import pydantic
from pydantic import Field

from usage_service import settings


class TlsConfigError(ValueError):
    """A TLS file is missing or unreadable (the message names the file, never its content)."""


class TlsFiles(settings.Group):
    cert_file: str = Field(  # PEM certificate chain, leaf first
        "", validation_alias="USAGE_TLS_CERT_FILE"
    )
    key_file: str = Field("", validation_alias="USAGE_TLS_KEY_FILE")  # PEM private key
    client_ca_file: str = Field(  # PEM CA bundle; set: clients must present a certificate it signed
        "", validation_alias="USAGE_TLS_CLIENT_CA_FILE"
    )

    @pydantic.model_validator(mode="after")
    def _paired(self) -> Self:
        self.check()
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)

    @property
    def mutual(self) -> bool:
        return bool(self.client_ca_file)

    def check(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise TlsConfigError("USAGE_TLS_CERT_FILE and USAGE_TLS_KEY_FILE go together")
        if self.client_ca_file and not self.cert_file:
            raise TlsConfigError("USAGE_TLS_CLIENT_CA_FILE needs USAGE_TLS_CERT_FILE")

    def server_credentials(self) -> grpc.ServerCredentials:
        self.check()
        ca = _read(self.client_ca_file) if self.client_ca_file else None
        return grpc.ssl_server_credentials(
            [(_read(self.key_file), _read(self.cert_file))],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )

    def channel_credentials(self, ca_file: str = "") -> grpc.ChannelCredentials:
        """Credentials for a local client such as `usage-service health`: it trusts `ca_file`
        (default: the server's own chain) and, under mutual TLS, presents the server's own
        certificate, which must then be signed by the client CA."""
        self.check()
        root = _read(ca_file or self.cert_file)
        if self.mutual:
            return grpc.ssl_channel_credentials(
                root, private_key=_read(self.key_file), certificate_chain=_read(self.cert_file)
            )
        return grpc.ssl_channel_credentials(root)


def _read(file: str) -> bytes:
    try:
        return pathlib.Path(file).read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"{file}: {exc.strerror or type(exc).__name__}") from None
