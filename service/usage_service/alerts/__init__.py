"""Threshold alerts: the alerter follows customers' change logs and records each crossing of a
plan's thresholds once per period (a 'threshold' change that WatchUsage streams, and a webhook
in the outbox); the deliverer sends the outbox's webhooks, signed, at least once."""
