"""Issue 21's side-by-side: the hand-written HTTP parser against httptools, aiohttp's parser and h11,
and the hand-written intake against an aiohttp.web server. Not a bench command: httptools and h11 are
not lab dependencies (``.venv/bin/pip install httptools h11``; aiohttp comes with the lab).

``python -m edge_lab.bench.http_parsers [small]``: parse cost per request (a tritonclient infer request
with a 12 KiB binary tensor, or with ``small`` a bare GET); ``python -m edge_lab.bench.http_parsers e2e``:
round trip of GET /v2/health/live on one keep-alive connection, both servers in processes of their own.
"""
import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["e2e"]:
        import socket, subprocess, sys, time, statistics, os
        PY = sys.executable
        AIO = r'''
        from aiohttp import web
        async def live(request): return web.Response(status=200, body=b"", content_type="application/json")
        app = web.Application(); app.router.add_get("/v2/health/live", live)
        import sys; print("ready", flush=True)
        web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
        '''
        OURS = r'''
        import sys
        from agent.config import parse_config
        from agent.service import Service
        cfg = parse_config({"config_version": 1, "agent": {"workers": 1}, "mqtt": {"enabled": False},
            "http": {"enabled": True, "port": int(sys.argv[1])},
            "models": [{"name": "mobilenet_digits", "card": "demo:mobilenet_digits"}]})
        s = Service(cfg); print("ready", flush=True)
        import time; time.sleep(3600)
        '''
        REQ = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
        def free():
            s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
        def rtt(port, n=3000):
            s = socket.create_connection(("127.0.0.1", port)); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            out = []
            for i in range(n + 300):
                t0 = time.perf_counter(); s.sendall(REQ)
                data = b""
                while b"\r\n\r\n" not in data: data += s.recv(4096)
                if i >= 300: out.append(time.perf_counter() - t0)
            s.close(); return statistics.median(out) * 1e6, sorted(out)[int(0.99 * len(out))] * 1e6
        procs = {}
        for name, src in (("hand-written intake", OURS), ("aiohttp.web 3.14", AIO)):
            port = free()
            p = subprocess.Popen([PY, "-c", __import__("textwrap").dedent(src), str(port)], stdout=subprocess.PIPE, text=True)
            assert p.stdout.readline().strip() == "ready"; time.sleep(0.5)
            procs[name] = (p, port)
        for rnd in range(3):
            for name, (p, port) in procs.items():
                m, p99 = rtt(port)
                print(f"round {rnd} {name:22s} median {m:6.1f} us  p99 {p99:6.1f} us", flush=True)
        for p, _ in procs.values(): p.kill()
    else:
        import time, statistics, json, numpy as np
        import httptools, h11
        from agent.intake import http as H
        
        frame = np.zeros((1, 64, 64, 3), np.uint8)
        hdr = json.dumps({"inputs": [{"name": "frames", "shape": [1, 64, 64, 3], "datatype": "UINT8",
                           "parameters": {"binary_data_size": frame.nbytes}}],
                          "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
        body = hdr + frame.tobytes()
        req = (b"POST /v2/models/mobilenet_digits/infer HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nUser-Agent: python/gevent-http-client-1.5.5\r\n"
               b"Accept-Encoding: gzip, deflate\r\nInference-Header-Content-Length: %d\r\nContent-Length: %d\r\n\r\n" % (len(hdr), len(body))) + body
        N = 20000
        
        def timeit(fn, reps=5):
            best = []
            for _ in range(reps):
                t0 = time.perf_counter()
                for _ in range(N):
                    fn()
                best.append((time.perf_counter() - t0) / N * 1e6)
            return statistics.median(best)
        
        # --- ours: the real _Connection path, intake stubbed to answer nothing
        class Stub:
            max_payload = 4 << 20
            max_head = 65536
            _heads = H._HeadCache()
            def __init__(self): self.n = 0
            def _handle(self, conn, head, body):
                self.n += 1; conn.busy = False
            def __getattr__(self, k): return 0
        class T:
            def write(self, d): pass
        stub = Stub()
        c = H._Connection.__new__(H._Connection)
        try:
            H._Connection.__init__(c, stub)
        except Exception as e:
            print("init", e)
        c.transport = T()
        def ours(): c.data_received(req)
        # --- httptools
        class P:
            __slots__ = ("url", "headers", "body", "done")
            def __init__(self): self.headers = {}; self.body = []; self.done = False
            def on_url(self, url): self.url = url
            def on_header(self, n, v): self.headers[n.lower()] = v
            def on_body(self, b): self.body.append(b)
            def on_message_complete(self): self.done = True
        p = P(); hp = httptools.HttpRequestParser(p)
        def ht():
            p.headers = {}; p.body = []
            hp.feed_data(req)
            b = p.body[0] if len(p.body) == 1 else b"".join(p.body)
            hp.get_method(); hp.should_keep_alive()
        # --- h11
        conn = h11.Connection(h11.SERVER)
        resp = h11.Response(status_code=200, headers=[("Content-Length", "0")])
        def h11p():
            conn.receive_data(req)
            while True:
                ev = conn.next_event()
                if type(ev) is h11.EndOfMessage or ev is h11.NEED_DATA: break
            conn.send(resp); conn.send(h11.EndOfMessage()); conn.start_next_cycle()
        # --- aiohttp's C parser (llhttp)
        import asyncio
        from aiohttp import http_parser
        loop = asyncio.new_event_loop()
        class Proto:
            transport = None
            def resume_reading(self, **k): pass
            def pause_reading(self, **k): pass
            def __getattr__(self, k): return None
        ap = http_parser.HttpRequestParser(Proto(), loop, 2**16, max_line_size=8190, max_field_size=8190)
        def aio():
            msgs, upgraded, tail = ap.feed_data(req)
            for msg, payload in msgs:
                pass
        import sys
        if len(sys.argv)>1: req = b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nUser-Agent: python/gevent-http-client-1.5.5\r\nAccept-Encoding: gzip, deflate\r\n\r\n"
        for name, fn in (("hand-written (_Connection, head cache)", ours), ("httptools 0.9", ht), ("aiohttp 3.14 C parser", aio), ("h11 0.16", h11p)):
            try:
                print(f"{name:40s} {timeit(fn):7.2f} us/request")
            except Exception as e:
                import traceback; traceback.print_exc()
