"""`hearth worker`: the headless device agent (advertise, answer pairing, serve paired devices).

`--data PATH` (repeatable) registers data that stays on this device: federated jobs train on it
in place and send back only adapter updates; pooled jobs never read it. Pairing requests are shown with their code and answered y/N on the terminal (read from stdin,
also when it is not a terminal, so tests and scripts can answer). Ctrl-C or SIGTERM stops it
and withdraws its mDNS record.
"""

from __future__ import annotations

import argparse


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("worker", help="run this device as a mesh worker (advertise, pair, serve)")
    p.add_argument("--name", help="the name other devices see (default: config mesh.name or the host name)")
    p.add_argument("--kind", choices=("laptop", "desktop", "phone"), help="device kind (default: config mesh.kind)")
    p.add_argument("--port", type=int, help="TCP port (default: config mesh.port; 0 = any free port)")
    p.add_argument("--interface", action="append", metavar="ADDRESS",
                   help="IPv4 address to listen and advertise on (repeatable; default: all)")
    p.add_argument("--no-pairing", action="store_true", help="refuse new pairing requests")
    p.add_argument("--job-memory-mb", type=float, metavar="MIB",
                   help="memory pooled training may use here (default: what is free); below the "
                        "backbone's size this device becomes a pipeline stage")
    p.add_argument("--data", action="append", metavar="PATH",
                   help="this device's own training data (JSONL chats or a folder of notes; repeatable): "
                        "federated jobs train on it here, it is never sent to another device; adds to "
                        "the config's mesh.private_data")
    return p


def run(args: argparse.Namespace) -> int:
    from core.locks import device_lock

    with device_lock("hearth worker"):
        return _serve(args)


def _serve(args: argparse.Namespace) -> int:
    import logging
    import queue
    import select
    import signal
    import sys
    import threading
    import time

    from mesh.pairing import IncomingPairing
    from mesh.service import MeshService

    logging.basicConfig(level=logging.INFO, format="hearth worker: %(message)s", stream=sys.stderr)
    from core.config import load_config
    from training.part_fields import local_data

    # Every line checked now: a bad one stops the worker here, before it advertises.
    local = local_data([*load_config().get("mesh.private_data"), *(args.data or [])])
    requests: queue.Queue[IncomingPairing] = queue.Queue()
    stop = threading.Event()
    said = threading.Lock()

    def say(text: str) -> None:
        # One write per line, under a lock: the prompt, pairing results and the main thread speak
        # from different threads, and `print` writes a line and its newline separately.
        try:
            with said:
                sys.stdout.write(text + "\n")
                sys.stdout.flush()
        except OSError:      # the terminal has gone (hung up): the worker carries on, or stops, quietly
            pass

    def prompt_loop() -> None:
        # One prompt at a time; each waits for a line until its request expires.
        while not stop.is_set():
            try:
                incoming = requests.get(timeout=0.5)
            except queue.Empty:
                continue
            if incoming.decided:
                continue
            say(f"Pairing request from {incoming.peer_name} ({incoming.peer_kind}, id {incoming.peer_id[:7]}) at {incoming.address}")
            say(f"Code: {incoming.code}")
            say(incoming.grant)
            say("Accept if the other device shows the same code. Accept? [y/N]")
            answer = _read_line(select, sys.stdin, incoming.expires_at, time, lambda: incoming.decided)
            if incoming.decided:
                say("Pairing request withdrawn.")
            elif answer is None:
                incoming.reject()
                say("Pairing request expired.")
            elif answer.strip().lower() in ("y", "yes"):
                incoming.accept()
                say(f"Accepted {incoming.peer_name}.")
            else:
                incoming.reject()
                say(f"Rejected {incoming.peer_name}.")

    overrides = dict(name=args.name, kind=args.kind, port=args.port, interfaces=args.interface)
    if args.no_pairing:
        overrides["accept_pairing"] = False
    service = MeshService(serve=True, on_pairing_request=requests.put, **overrides)
    service.start()
    assert service.agent is not None
    from mesh.job_parts import register_job_parts

    budget = int(args.job_memory_mb * (1 << 20)) if args.job_memory_mb else None
    register_job_parts(service.agent, budget, local)   # pooled and federated training parts
    service.agent.responder.on_result = lambda incoming, outcome: say(f"Pairing with {incoming.peer_name}: {outcome}")
    # SIGHUP too: a worker whose terminal closes leaves like one stopped with Ctrl-C, saying
    # goodbye on mDNS, instead of dying where it stands (peers would wait out its record).
    for number in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if number is not None:
            signal.signal(number, lambda *_: stop.set())
    threading.Thread(target=prompt_loop, daemon=True).start()
    say(f"Hearth worker {service.config.name} ({service.config.kind}) on port {service.agent.port}")
    say(f"Device id: {service.device_id}")
    if local.paths:
        say(f"Local data: {local.conversations} conversations in {len(local.paths)} source(s), for federated jobs only")
    say("Pairing: " + ("accepting requests" if service.config.accept_pairing else "refused (--no-pairing)"))
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        service.stop()
        say("Stopped; the mDNS record is withdrawn.")
    return 0


def _read_line(select, stream, deadline: float, time, cancelled) -> str | None:
    """A line from `stream` before `deadline` (epoch seconds), or None; gives up if cancelled()."""
    while time.time() < deadline and not cancelled():
        try:
            ready, _, _ = select.select([stream], [], [], 0.25)
        except (ValueError, OSError):
            return None
        if ready:
            line = stream.readline()
            return line if line else None
    return None
