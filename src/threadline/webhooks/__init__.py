"""Webhooks: endpoints, a durable outbox written with the events it announces, and the
background deliverer that signs (Standard Webhooks) and retries deliveries."""
