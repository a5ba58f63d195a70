"""A thin HTTP proxy on 127.0.0.1 in front of a Tinker-compatible server, for SDKs it is a
little behind. Standard library only.

    python shim.py --port 8001 --upstream http://127.0.0.1:8000

Everything is forwarded as is, but one thing: the tinker 0.38 SDK asserts that an
`/api/v1/asample` reply (the sample's future) carries `sample_sequence_ids`, one id per
requested sample, fixed at submission; SkyRL 0.4.0's server sends none. The shim adds
them, `<request_id>-<i>`, distinct per sequence as the SDK wants, when they are missing.
"""

import argparse
import http.client
import http.server
import json
import urllib.parse

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
              "content-length"}
UPSTREAM_TIMEOUT = 900  # seconds: a retrieve_future long-poll, a checkpoint being written on a busy CPU


def with_sequence_ids(request: bytes, reply: bytes) -> bytes:
    future = json.loads(reply)
    if isinstance(future, dict) and "request_id" in future and not future.get("sample_sequence_ids"):
        n = int(json.loads(request).get("num_samples", 1))
        future["sample_sequence_ids"] = [f"{future['request_id']}-{i}" for i in range(n)]
        return json.dumps(future).encode()
    return reply


def handler(upstream: urllib.parse.SplitResult):
    class Proxy(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's connection pools expect

        def forward(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=UPSTREAM_TIMEOUT)
            try:
                conn.request(self.command, self.path, body=body or None, headers=headers)
                response = conn.getresponse()
                data = response.read()
            except OSError as e:
                self.send_error(502, f"upstream {upstream.geturl()}: {e}")
                return
            finally:
                conn.close()
            if self.path.split("?")[0] == "/api/v1/asample" and response.status == 200:
                data = with_sequence_ids(body, data)
            self.send_response(response.status)
            for k, v in response.getheaders():
                if k.lower() not in HOP_BY_HOP and k.lower() not in ("server", "date"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = forward

        def log_message(self, *args):
            pass

    return Proxy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
    args = parser.parse_args()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), handler(urllib.parse.urlsplit(args.upstream)))
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
