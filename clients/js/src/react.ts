// React bindings: a provider, and hooks that join rooms for as long as a component is mounted.
//
// StrictMode mounts, unmounts and mounts again every effect in development. A hook that joined
// on mount and left on unmount would join twice (two subscriptions, duplicate events, a presence
// ghost). Here the leave is deferred by one tick: the second mount takes a second reference on
// the same subscription before the first is given back, so the relay sees one join.
//
// SSR: nothing runs on the server (effects never do there; snapshots have server defaults), and
// the provider starts the client's connection from an effect, in the browser.

import {
  createContext,
  createElement,
  useContext,
  useEffect,
  useRef,
  useState,
  useSyncExternalStore,
  type ReactNode,
} from "react";
import type { EventMessage, JoinedMessage, PgrelayClient, PresenceUsers, Room, Status } from "./index.js";

const ClientContext = createContext<PgrelayClient | null>(null);

export function PgrelayProvider(props: { client: PgrelayClient; children?: ReactNode }) {
  const { client } = props;
  useEffect(() => {
    client.connect();
  }, [client]);
  return createElement(ClientContext.Provider, { value: client }, props.children);
}

export function usePgrelayClient(): PgrelayClient {
  const client = useContext(ClientContext);
  if (!client) throw new Error("pgrelay-client/react: wrap your app in <PgrelayProvider client={...}>");
  return client;
}

/** `connecting` | `open` | `reconnecting` | `offline` | `closed`; `connecting` on the server. */
export function useConnectionStatus(): Status {
  const client = usePgrelayClient();
  return useSyncExternalStore(
    (notify) => client.on("status", notify),
    () => client.status,
    () => "connecting" as Status,
  );
}

export interface RoomHandlers {
  /** Every event of the room. */
  onEvent?: (event: EventMessage) => void;
  /** The relay could not replay what was missed (`recovered: false`): refetch your data. */
  onResync?: (joined: JoinedMessage) => void;
  /** The join was refused (`forbidden`, ...) or access was revoked. */
  onError?: (error: Error) => void;
  /** Resume after this position (from your API's `pgrelay.position()`). */
  since?: string;
}

/** Joins `name` while mounted (null: no room). Returns the room once joined on this render
 * pass, for `usePresence`/`useTyping`/`caughtUp`. Handlers may change between renders freely. */
export function useRoom(name: string | null, handlers: RoomHandlers = {}): Room | null {
  const client = usePgrelayClient();
  const latest = useRef(handlers);
  latest.current = handlers;
  const [room, setRoom] = useState<Room | null>(null);
  const since = handlers.since;
  useEffect(() => {
    if (!name) return;
    const handle = client.join(name, since === undefined ? {} : { since });
    handle.on("event", (e: EventMessage) => latest.current.onEvent?.(e));
    handle.on("resync", (j: JoinedMessage) => latest.current.onResync?.(j));
    handle.on("error", (err: Error) => latest.current.onError?.(err));
    setRoom(handle);
    return () => {
      setTimeout(() => handle.leave(), 0);
      setRoom((current) => (current === handle ? null : current));
    };
  }, [client, name, since]);
  return room;
}

const NO_PRESENCE: PresenceUsers = Object.freeze({}) as PresenceUsers;
const NO_USERS: string[] = Object.freeze([]) as unknown as string[];
const noop = () => () => {};

/** Who is in the room: user id → one meta per connection. */
export function usePresence(room: Room | null): PresenceUsers {
  return useSyncExternalStore(
    room ? (notify) => room.on("presence", notify) : noop,
    () => room?.presence ?? NO_PRESENCE,
    () => NO_PRESENCE,
  );
}

/** Who else is typing, and `setTyping(true)` to call on each keystroke. */
export function useTyping(room: Room | null): { users: string[]; setTyping: (active: boolean) => void } {
  const cache = useRef<{ room: Room | null; users: string[] }>({ room: null, users: NO_USERS });
  const users = useSyncExternalStore(
    room
      ? (notify) =>
          room.on("typing", (state: { users: string[] }) => {
            cache.current = { room, users: state.users };
            notify();
          })
      : noop,
    () => (cache.current.room === room ? cache.current.users : NO_USERS),
    () => NO_USERS,
  );
  return { users, setTyping: (active: boolean) => room?.typing(active) };
}
