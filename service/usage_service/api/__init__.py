"""gRPC servicers: proto <-> domain types, validation and error mapping. No SQL here."""
