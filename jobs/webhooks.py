"""Signed webhooks (Standard Webhooks) to allowed hosts only.

A webhook makes the job service send a request where a user tells it to: without care that is a
server-side request forgery into the cluster. So: the target's host must be on the operator's
allow-list (``JOBS_WEBHOOK_ALLOWED_HOSTS``: ``host`` allows any port, ``host:port`` that port);
the name is resolved at delivery and refused if any address it resolves to is loopback,
link-local, private or otherwise not public, unless that address itself is listed; the
connection goes to the address that was checked (no second lookup an attacker could answer
differently); redirects are not followed.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import json
import secrets
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
from standardwebhooks.webhooks import Webhook

from jobs.errors import InvalidRequest

EVENT_TYPES = {"completed": "video.completed", "failed": "video.failed", "cancelled": "video.cancelled"}
DELIVERY_TIMEOUT_S = 10.0


class WebhookRefused(Exception):
    """The target is not allowed (at delivery: it resolved to a forbidden address). Not retried."""


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode("ascii")


def _split(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("webhook_url must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise ValueError("webhook_url must not carry credentials")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, parts.hostname.lower().rstrip("."), port


def _listed(host: str, port: int, allowed: tuple[str, ...]) -> bool:
    for entry in allowed:
        name, _, entry_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if not name:  # "host" without a port
            name, entry_port = entry, ""
        if name.strip("[]") == host and (not entry_port or entry_port == str(port)):
            return True
    return False


def _address_allowed(address: str, port: int, allowed: tuple[str, ...]) -> bool:
    ip = ipaddress.ip_address(address)
    if ip.is_global:
        return True
    # Loopback, private, link-local (cloud metadata at 169.254.169.254), unspecified...: only
    # when the operator listed that very address.
    return _listed(str(ip), port, allowed)


def check_webhook_url(url: object, allowed: tuple[str, ...]) -> str:
    """At submission: the URL's form and its host against the allow-list (400 naming the field)."""
    if not isinstance(url, str) or len(url) > 2048:
        raise InvalidRequest("webhook_url must be a URL string", "webhook_url")
    try:
        _, host, port = _split(url)
    except ValueError as e:
        raise InvalidRequest(str(e), "webhook_url") from None
    if not allowed:
        raise InvalidRequest("webhooks are off on this server (no JOBS_WEBHOOK_ALLOWED_HOSTS)", "webhook_url")
    if not _listed(host, port, allowed):
        raise InvalidRequest(f"webhook_url host {host}:{port} is not on this server's allow-list", "webhook_url")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return url  # a name: checked again when it is resolved at delivery
    if not _address_allowed(str(ip), port, allowed):
        raise InvalidRequest(f"webhook_url address {ip} is not public and not listed", "webhook_url")
    return url


@dataclass(frozen=True)
class Delivery:
    status: int
    elapsed_s: float


async def _resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def event_body(event_type: str, video_id: str, event_id: str) -> dict:
    return {"object": "event", "id": event_id, "type": event_type, "created_at": int(time.time()),
            "data": {"id": video_id}}


async def deliver(url: str, secret: str, event: dict, allowed: tuple[str, ...]) -> Delivery:
    """POST one signed event. Raises WebhookRefused (never retried) or httpx errors / a non-2xx
    status as RuntimeError (retried with backoff by the caller)."""
    scheme, host, port = _split(url)
    if not _listed(host, port, allowed):
        raise WebhookRefused(f"{host}:{port} is no longer on the allow-list")
    addresses = await _resolve(host, port)
    refused = [a for a in addresses if not _address_allowed(a, port, allowed)]
    if refused or not addresses:
        raise WebhookRefused(f"{host} resolves to {', '.join(refused) or 'nothing'}: not public and not listed")
    payload = json.dumps(event, separators=(",", ":"))
    timestamp = int(time.time())
    signature = Webhook(secret).sign(event["id"], datetime.datetime.fromtimestamp(timestamp, tz=datetime.timezone.utc), payload)
    headers = {"content-type": "application/json", "webhook-id": event["id"],
               "webhook-timestamp": str(timestamp), "webhook-signature": signature,
               "user-agent": "wan-jobs-webhooks/1"}
    target = url
    address = addresses[0]
    if scheme == "http":
        # Connect to the checked address (a second lookup could answer otherwise); Host stays the name.
        netloc = f"[{address}]" if ":" in address else address
        parts = urlsplit(url)
        target = parts._replace(netloc=f"{netloc}:{port}").geturl()
        headers["host"] = parts.netloc
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=DELIVERY_TIMEOUT_S, follow_redirects=False, trust_env=False) as client:
        response = await client.post(target, content=payload, headers=headers)
    if not 200 <= response.status_code < 300:
        raise RuntimeError(f"webhook answered {response.status_code}")
    return Delivery(response.status_code, time.perf_counter() - started)
