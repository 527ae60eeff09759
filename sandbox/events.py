"""Evolution API events: payload builders, envelopes and the bus that times and fans them out to sinks.

What Evolution API v2 (2.2/2.3, Baileys channel) publishes and how (SPEC §5 "Evolution API events over
RabbitMQ"; source: ``src/api/services/channel.service.ts`` ``sendDataWebhook``,
``src/api/integrations/channel/whatsapp/whatsapp.baileys.service.ts``, the webhook and RabbitMQ
controllers under ``src/api/integrations/event/``):

* envelope ``{"event", "instance", "data", "server_url", "date_time", "sender", "apikey"}``; the webhook
  adds ``"destination"`` (the URL). ``sender`` is the instance's own WhatsApp JID (its ``wuid``), not
  the chat's; ``date_time`` is an ISO timestamp with milliseconds and a ``Z``;
* ``messages.upsert``: the message as Evolution's ``prepareMessage`` shapes it: ``key`` exactly as
  Baileys gives it (``remoteJid``, ``fromMe``, ``id``; ``participant`` in groups and status
  broadcasts; ``addressingMode`` and ``remoteJidAlt`` / ``participantAlt`` for LID chats),
  ``pushName``, ``status`` (``DELIVERY_ACK`` for a received message), ``message``, ``messageType``,
  ``messageTimestamp`` (seconds), ``instanceId``, ``source``;
* ``messages.update``: ``{"keyId", "remoteJid", "fromMe", "status", "instanceId", "messageId"}``;
* ``send.message``: the sent message in the same shape as ``messages.upsert`` (what ``sendText``
  answers), published right after the send;
* ``connection.update``: ``{"instance", "state", "statusReason"}`` (``open`` adds ``wuid``,
  ``profileName``, ``profilePictureUrl``). Evolution publishes ``close`` only when it will not
  reconnect by itself (logged out: statusReason 401); a drop it recovers from shows as
  ``connecting`` then ``open``.

:class:`EventBus` holds a timer heap (receipts trail a send by ``webhook_gap_ms`` each, scripted replies
by their delay) and one thread that, when an event is due, builds its envelope and hands it to every
sink that takes that event (:class:`Sink`: the webhook and the RabbitMQ global-mode publisher). Events
scheduled before a ledger reset are dropped when they come due. Sinks never block the bus: each has
its own bounded queue and threads; what they deliver, fail or drop is counted in the ledger per sink
and event.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

__all__ = [
    "EVENTS",
    "MESSAGE_TYPES",
    "EventBus",
    "Sink",
    "connection_data",
    "date_time",
    "instance_id",
    "lid_for",
    "message_content",
    "messages_update_data",
    "owner_jid",
    "group_jid",
    "sent_message_data",
]

logger = logging.getLogger(__name__)

#: the events the sandbox publishes (Evolution's names, with dots)
EVENTS = ("messages.upsert", "messages.update", "connection.update", "send.message")

#: Evolution closes for good (and publishes state "close") only for these reasons: loggedOut,
#: forbidden, 402, 406 (``codesToNotReconnect``); the sandbox's default for "close" is loggedOut
CLOSE_STATUS_REASON = 401


def _hex(*parts: Any, n: int = 32) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:n]


def _digits_of(*parts: Any, n: int) -> str:
    return str(int(_hex(*parts, n=24), 16))[:n].rjust(n, "7")


def instance_id(instance: str) -> str:
    """The ``instanceId`` field of an instance's messages (stable per name)."""
    return hashlib.md5(instance.encode()).hexdigest()


def owner_jid(instance: str) -> str:
    """The instance's own WhatsApp JID (Evolution's ``wuid``; the envelope's ``sender``), stable per name."""
    return f"55119{_digits_of('owner', instance, n=8)}@s.whatsapp.net"


def lid_for(number: str) -> str:
    """A stable 15-digit LID for a phone number (WhatsApp gives each user one LID, whatever the chat)."""
    return "1" + _digits_of("lid", number, n=14)


def group_jid(instance: str, number: str) -> str:
    """A stable group JID for scripted group messages."""
    return f"120363{_digits_of('group', instance, number, n=12)}@g.us"


def date_time(at: float | None = None) -> str:
    """Evolution's ``date_time``: ISO 8601 with milliseconds and ``Z``."""
    moment = dt.datetime.fromtimestamp(time.time() if at is None else at, dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _media(kind: str, seed: str) -> dict[str, Any]:
    """Fields every WhatsApp media message carries (encrypted on WhatsApp's CDN)."""
    digest = hashlib.sha256(f"{kind}|{seed}".encode()).digest()
    return {
        "url": f"https://mmg.whatsapp.net/v/t62.7117-24/{digest.hex()[:20]}.enc",
        "fileSha256": base64.b64encode(digest).decode(),
        "fileEncSha256": base64.b64encode(digest[::-1]).decode(),
        "mediaKey": base64.b64encode(hashlib.sha256(digest).digest()).decode(),
        "fileLength": str(4_000 + digest[0] * 97),
        "directPath": f"/v/t62.7117-24/{digest.hex()[:20]}.enc",
        "mediaKeyTimestamp": str(int(time.time())),
    }


def _text_message(text: str | None, seed: str) -> dict[str, Any]:
    return {"conversation": text or ""}


def _extended_text(text: str | None, seed: str) -> dict[str, Any]:
    # Evolution before 2.3 kept this shape (newer ones fold it into "conversation")
    return {"extendedTextMessage": {"text": text or ""}}


def _audio(text: str | None, seed: str) -> dict[str, Any]:
    return {"audioMessage": {**_media("audio", seed), "mimetype": "audio/ogg; codecs=opus", "seconds": 7, "ptt": True}}


def _image(text: str | None, seed: str) -> dict[str, Any]:
    body: dict[str, Any] = {**_media("image", seed), "mimetype": "image/jpeg", "height": 1280, "width": 960}
    if text:
        body["caption"] = text
    return {"imageMessage": body}


def _video(text: str | None, seed: str) -> dict[str, Any]:
    body: dict[str, Any] = {**_media("video", seed), "mimetype": "video/mp4", "seconds": 12}
    if text:
        body["caption"] = text
    return {"videoMessage": body}


def _document(text: str | None, seed: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        **_media("document", seed),
        "mimetype": "application/pdf",
        "fileName": "documento.pdf",
        "title": "documento.pdf",
        "pageCount": 2,
    }
    if text:
        body["caption"] = text
    return {"documentMessage": body}


def _sticker(text: str | None, seed: str) -> dict[str, Any]:
    return {"stickerMessage": {**_media("sticker", seed), "mimetype": "image/webp", "isAnimated": False}}


def _location(text: str | None, seed: str) -> dict[str, Any]:
    return {"locationMessage": {"degreesLatitude": -23.5613, "degreesLongitude": -46.6565, "name": text or None}}


def _contact(text: str | None, seed: str) -> dict[str, Any]:
    name = text or "Contato"
    vcard = f"BEGIN:VCARD\nVERSION:3.0\nFN:{name}\nTEL;type=CELL:+55 11 91234-5678\nEND:VCARD"
    return {"contactMessage": {"displayName": name, "vcard": vcard}}


#: messageType -> builder of data.message for that type (text is the caption or the text, when any)
MESSAGE_TYPES: dict[str, Callable[[str | None, str], dict[str, Any]]] = {
    "conversation": _text_message,
    "extendedTextMessage": _extended_text,
    "audioMessage": _audio,
    "imageMessage": _image,
    "videoMessage": _video,
    "documentMessage": _document,
    "stickerMessage": _sticker,
    "locationMessage": _location,
    "contactMessage": _contact,
}


def message_content(message_type: str, text: str | None, seed: str) -> dict[str, Any]:
    """``data.message`` for one message type (KeyError for an unknown type)."""
    return MESSAGE_TYPES[message_type](text, seed)


def sent_message_data(instance: str, remote_jid: str, key_id: str, text: str) -> dict[str, Any]:
    """What ``sendText`` answers, and the ``data`` of the ``send.message`` event that follows it."""
    return {
        "key": {"remoteJid": remote_jid, "fromMe": True, "id": key_id},
        "pushName": "",
        "status": "PENDING",
        "message": {"conversation": text},
        "contextInfo": None,
        "messageType": "conversation",
        "messageTimestamp": int(time.time()),
        "instanceId": instance_id(instance),
        "source": "unknown",
    }


def messages_update_data(instance: str, key_id: str, remote_jid: str, status: str) -> dict[str, Any]:
    """``data`` of a ``messages.update`` receipt of a message the instance sent."""
    return {
        "keyId": key_id,
        "remoteJid": remote_jid,
        "fromMe": True,
        "status": status,
        "instanceId": instance_id(instance),
        "messageId": _hex("message-row", instance, key_id, n=25),
    }


def connection_data(instance: str, state: str, status_reason: int | None = None) -> dict[str, Any]:
    """``data`` of a ``connection.update`` (``open`` carries the owner's JID and profile as Evolution's does)."""
    if status_reason is None:
        status_reason = CLOSE_STATUS_REASON if state == "close" else 200
    data: dict[str, Any] = {"instance": instance}
    if state == "open":
        data.update(wuid=owner_jid(instance), profileName=instance, profilePictureUrl=None)
    data.update(state=state, statusReason=status_reason)
    return data


class Sink(Protocol):
    """Where envelopes go. ``submit`` never blocks for long; outcomes are counted through the ledger."""

    name: str

    def accepts(self, event: str, cfg: dict[str, Any]) -> bool:
        """Whether this sink takes ``event`` under the current fault document."""
        ...

    def submit(self, envelope: dict[str, Any], cfg: dict[str, Any]) -> None:
        """Queue one envelope for delivery."""
        ...

    def view(self) -> dict[str, Any]:
        """State for the control API (no secrets)."""
        ...

    def stop(self, timeout: float = 2.0) -> None:
        """Stop delivering (pending envelopes may be abandoned)."""
        ...


class EventBus:
    """Times events and fans them out to the sinks.

    ``faults`` returns the current fault document, ``epoch`` the ledger's epoch (events scheduled in an
    older epoch are dropped when due), ``server_url`` the sandbox's own URL for the envelopes.
    """

    def __init__(
        self,
        *,
        sinks: list[Sink],
        faults: Callable[[], dict[str, Any]],
        epoch: Callable[[], int],
        on_dispatch: Callable[[str], None],
    ) -> None:
        self.sinks = sinks
        self.server_url = ""
        self._faults = faults
        self._epoch = epoch
        self._on_dispatch = on_dispatch
        self._heap: list[tuple[float, int, dict[str, Any]]] = []
        self._counter = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="sandbox-events", daemon=True)
        self._thread.start()

    def wants(self, event: str) -> bool:
        """Whether any sink would take ``event`` now (lets the hot send path skip work nobody receives)."""
        cfg = self._faults()
        return any(sink.accepts(event, cfg) for sink in self.sinks)

    def schedule(
        self,
        event: str,
        instance: str,
        data: dict[str, Any],
        *,
        delay_s: float = 0.0,
        epoch: int | None = None,
        on_publish: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """Publish ``event`` after ``delay_s``; ``on_publish(envelope)`` runs on the bus thread when it goes out."""
        job = {
            "event": event,
            "instance": instance,
            "data": data,
            "epoch": self._epoch() if epoch is None else epoch,
            "on_publish": on_publish,
        }
        due = time.monotonic() + max(0.0, delay_s)
        with self._cond:
            heapq.heappush(self._heap, (due, next(self._counter), job))
            if self._heap[0][2] is job:
                self._cond.notify()

    def pending(self) -> int:
        """Events scheduled and not yet due."""
        with self._cond:
            return len(self._heap)

    def envelope(self, event: str, instance: str, data: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
        """The envelope Evolution sends (sinks add their own fields, e.g. the webhook's destination)."""
        return {
            "event": event,
            "instance": instance,
            "data": data,
            "server_url": self.server_url,
            "date_time": date_time(),
            "sender": owner_jid(instance),
            "apikey": cfg.get("webhook_secret"),
        }

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the bus thread and every sink."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout / 2)
        for sink in self.sinks:
            sink.stop(timeout / 2)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    if self._heap:
                        wait = self._heap[0][0] - time.monotonic()
                        if wait <= 0:
                            break
                        self._cond.wait(wait)
                    else:
                        self._cond.wait()
                if self._stopped:
                    return
                _, _, job = heapq.heappop(self._heap)
            try:
                self._dispatch(job)
            except Exception:  # a sandbox bug must not stop every later event
                logger.exception("event %s of %s could not be dispatched", job["event"], job["instance"])

    def _dispatch(self, job: dict[str, Any]) -> None:
        if job["epoch"] != self._epoch():
            return  # scheduled before a reset
        cfg = self._faults()
        envelope = self.envelope(job["event"], job["instance"], job["data"], cfg)
        self._on_dispatch(job["event"])
        if job["on_publish"] is not None:
            job["on_publish"](envelope)
        for sink in self.sinks:
            if sink.accepts(job["event"], cfg):
                sink.submit(envelope, cfg)
