/** The peer directory the CLI uses when --dir is left out. */
export function defaultDir(): string;

/** A refusal or failure, named like the CLI's errors. */
export class AgentLinkError extends Error {
  constructor(message: string, code?: string, exitCode?: number);
  /** The CLI's error name: "TargetOffline", "InboxFull", "DaemonNotRunning", ... */
  code: string;
  /** The exit code the CLI ends with for it. */
  exitCode: number;
}

export interface Receipt {
  id: string;
  to: string;
  deliveredAt: number;
  readAt?: number;
}

export interface Message {
  id: string;
  /** The sender, INSTANCE/AGENT. */
  from: string;
  to: string;
  sentAt: number;
  receivedAt: number;
  /** The payload as text (invalid UTF-8 replaced). */
  message: string;
  data: Buffer;
}

export interface AgentLinkOptions {
  agentId: string;
  /** The peer directory (made by `agent-link init`). */
  dir?: string;
  /** Its agent-link-config.json, instead of `dir`. */
  configPath?: string;
}

export class AgentLink {
  constructor(options: AgentLinkOptions);
  readonly agentId: string;
  readonly dir: string;
  readonly socketPath: string;
  send(to: string, message: string | Uint8Array, options?: { timeout?: number; waitRead?: number }): Promise<Receipt>;
  register(): Promise<void>;
  inbox(options?: { limit?: number }): Promise<Message[]>;
  recv(options?: { wait?: number }): Promise<Message | null>;
  ack(id: string): Promise<void>;
  status(): Promise<Record<string, unknown>>;
  onMessage(cb: (msg: Message) => void | Promise<void>, options?: { onError?: (e: AgentLinkError) => void }): Promise<void>;
  close(): Promise<void>;
}
