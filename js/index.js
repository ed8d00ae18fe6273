// agent-link for JavaScript: a thin client of the local `agent-link daemon`
// (HTTP/1.1 + JSON on DIR/agent-link.sock, LOCAL-API.md). No dependencies;
// Node 18 or newer.
//
//   import { AgentLink } from "agent-link";
//   const link = new AgentLink({ agentId: "xiaodingding" });
//   const receipt = await link.send("instance-002/xiaobaozi", "hi");
//   link.onMessage((msg) => console.log(msg.from, msg.message));

import http from "node:http";
import os from "node:os";
import path from "node:path";

/** The peer directory the CLI uses when --dir is left out. */
export function defaultDir() {
  const xdg = process.env.XDG_DATA_HOME;
  if (xdg) return path.join(xdg, "agent-link");
  return path.join(os.homedir(), ".local", "share", "agent-link");
}

/** A refusal or failure, named like the CLI's errors (`code`), with the
 * CLI's `exitCode`. */
export class AgentLinkError extends Error {
  constructor(message, code = "Error", exitCode = 1) {
    super(message);
    this.name = "AgentLinkError";
    this.code = code;
    this.exitCode = exitCode;
  }
}

function request(socketPath, dir, method, urlPath, body, timeoutMs) {
  return new Promise((resolve, reject) => {
    const payload = body === undefined ? "" : JSON.stringify(body);
    const req = http.request(
      {
        socketPath,
        method,
        path: urlPath,
        headers: { "content-type": "application/json", "content-length": Buffer.byteLength(payload) },
        timeout: timeoutMs,
      },
      (res) => {
        const chunks = [];
        res.on("data", (c) => chunks.push(c));
        res.on("end", () => {
          let v;
          try {
            v = JSON.parse(Buffer.concat(chunks).toString("utf8") || "{}");
          } catch {
            return reject(new AgentLinkError(`the daemon answered HTTP ${res.statusCode} with something that is not JSON`));
          }
          if (res.statusCode >= 200 && res.statusCode < 300) return resolve(v);
          reject(new AgentLinkError(v.message ?? `HTTP ${res.statusCode}`, v.error ?? "Error", v.exit_code ?? 1));
        });
        res.on("error", reject);
      },
    );
    req.on("timeout", () => req.destroy(new AgentLinkError("no answer from the daemon in time", "Timeout", 5)));
    req.on("error", (e) => reject(socketError(e, socketPath, dir)));
    req.end(payload);
  });
}

function socketError(e, socketPath, dir) {
  if (e instanceof AgentLinkError) return e;
  if (e.code === "ENOENT" || e.code === "ECONNREFUSED") {
    return new AgentLinkError(
      `no daemon for ${dir}: start it with \`agent-link daemon --dir ${dir}\``,
      "DaemonNotRunning",
      1,
    );
  }
  if (e.code === "EACCES") {
    return new AgentLinkError(`${socketPath} belongs to another user: run as the daemon's user`, "PermissionDenied", 1);
  }
  if (e.code === "ECONNRESET" || e.code === "EPIPE") {
    return new AgentLinkError(
      `the daemon at ${socketPath} closed the connection: it refuses clients of another user`,
      "PermissionDenied",
      1,
    );
  }
  return new AgentLinkError(`the daemon at ${socketPath}: ${e.message}`, "Unavailable", 1);
}

function toMessage(v) {
  const data = "message" in v ? Buffer.from(v.message, "utf8") : Buffer.from(v.message_base64 ?? "", "base64");
  return {
    id: v.id,
    from: v.from,
    to: v.to,
    sentAt: v.sent_at,
    receivedAt: v.received_at,
    message: data.toString("utf8"),
    data,
  };
}

export class AgentLink {
  /**
   * @param {{agentId: string, dir?: string, configPath?: string}} options
   */
  constructor({ agentId, dir, configPath } = {}) {
    if (!agentId) throw new AgentLinkError("agentId is required", "BadRequest", 2);
    this.agentId = agentId;
    this.dir = dir ?? (configPath ? path.dirname(path.resolve(configPath)) : defaultDir());
    this.socketPath = path.join(this.dir, "agent-link.sock");
    this._stream = null;
    this._closed = false;
  }

  _call(method, urlPath, body, timeoutMs = 120_000) {
    return request(this.socketPath, this.dir, method, urlPath, body, timeoutMs);
  }

  _agentPath(suffix = "") {
    return `/v1/agents/${encodeURIComponent(this.agentId)}${suffix}`;
  }

  /** Send `message` (string or Buffer) to `to` (INSTANCE/AGENT, or a bare
   * agent name); resolves to `{id, to, deliveredAt, readAt?}`. */
  async send(to, message, { timeout, waitRead } = {}) {
    const body = { from: this.agentId, to };
    if (Buffer.isBuffer(message) || message instanceof Uint8Array) {
      body.message_base64 = Buffer.from(message).toString("base64");
    } else {
      body.message = String(message);
    }
    if (timeout !== undefined) body.timeout_secs = Math.max(1, Math.round(timeout));
    if (waitRead !== undefined) body.wait_read_secs = Math.max(1, Math.round(waitRead));
    const limit = ((timeout ?? 3600) + (waitRead ?? 0) + 10) * 1000;
    const v = await this._call("POST", "/v1/send", body, limit);
    return { id: v.id, to: v.to, deliveredAt: v.delivered_at, readAt: v.read_at };
  }

  /** Register this agent at the daemon (idempotent). */
  async register() {
    await this._call("POST", "/v1/agents", { agent: this.agentId });
  }

  /** The waiting messages, oldest first, not removed. */
  async inbox({ limit = 100 } = {}) {
    const v = await this._call("GET", this._agentPath(`/inbox?limit=${limit}`));
    return v.messages.map(toMessage);
  }

  /** The oldest waiting message, removed once returned; `wait` seconds to
   * wait for one; `null` when none came. */
  async recv({ wait } = {}) {
    let q = "/inbox?limit=1";
    if (wait !== undefined) q += `&wait=${Math.max(0, Math.round(wait))}`;
    const v = await this._call("GET", this._agentPath(q), undefined, ((wait ?? 0) + 60) * 1000);
    if (v.messages.length === 0) return null;
    const m = toMessage(v.messages[0]);
    await this.ack(m.id).catch((e) => {
      if (e.code !== "UnknownMessage") throw e;
    });
    return m;
  }

  /** Remove message `id` (after `inbox`). */
  async ack(id) {
    await this._call("DELETE", this._agentPath(`/inbox/${encodeURIComponent(id)}`));
  }

  /** The daemon's status. */
  async status() {
    return this._call("GET", "/v1/status");
  }

  /** Start receiving: registers the agent, then calls `cb(msg)` for every
   * waiting and arriving message, acking each once `cb` (which may be
   * async) returned. Resolves once attached to the event stream; errors
   * of the stream go to `onError` (default: thrown from the next call). */
  async onMessage(cb, { onError } = {}) {
    await this.register();
    const req = http.request({ socketPath: this.socketPath, method: "GET", path: this._agentPath("/events") });
    this._stream = req;
    this._closed = false;
    const fail = (e) => {
      if (this._closed) return;
      if (onError) onError(e);
      else this._error = e;
    };
    await new Promise((resolve, reject) => {
      req.on("error", (e) => {
        const err = socketError(e, this.socketPath, this.dir);
        reject(err);
        fail(err);
      });
      req.on("response", (res) => {
        if (res.statusCode !== 200) {
          const chunks = [];
          res.on("data", (c) => chunks.push(c));
          res.on("end", () => {
            const v = JSON.parse(Buffer.concat(chunks).toString("utf8") || "{}");
            reject(new AgentLinkError(v.message ?? `HTTP ${res.statusCode}`, v.error ?? "Error", v.exit_code ?? 1));
          });
          return;
        }
        resolve();
        let buf = "";
        let chain = Promise.resolve();
        res.setEncoding("utf8");
        res.on("data", (chunk) => {
          buf += chunk;
          let i;
          while ((i = buf.indexOf("\n")) >= 0) {
            const line = buf.slice(0, i).trim();
            buf = buf.slice(i + 1);
            if (!line) continue;
            const m = toMessage(JSON.parse(line));
            // One at a time, in order; acked once handled.
            chain = chain
              .then(async () => {
                if (this._closed) return;
                await cb(m);
                await this.ack(m.id).catch((e) => {
                  if (e.code !== "UnknownMessage") throw e;
                });
              })
              .catch(fail);
          }
        });
        res.on("end", () => fail(new AgentLinkError("the daemon closed the event stream (it stopped?)", "Unavailable", 1)));
      });
      req.end();
    });
  }

  /** Stop receiving. */
  async close() {
    this._closed = true;
    if (this._stream) {
      this._stream.destroy();
      this._stream = null;
    }
  }
}
