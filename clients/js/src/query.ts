// TanStack Query glue: keep cached queries in step with a room's events.
//
// Each event either patches the cached data it touches (when you say how) or invalidates those
// queries so they refetch; `resync` (the relay could not replay what was missed) invalidates
// everything the room feeds. No import of TanStack itself: any object with these three methods
// works, so this file adds no dependency.

import type { EventMessage, Room } from "./index.js";

export type QueryKey = readonly unknown[];

/** The part of TanStack Query's `QueryClient` this helper uses. */
export interface QueryClientLike {
  invalidateQueries(filters: { queryKey: QueryKey }): unknown;
  setQueryData(queryKey: QueryKey, updater: (old: any) => any): unknown;
  getQueryData(queryKey: QueryKey): unknown;
}

export interface SyncOptions {
  /** The queries an event touches. Default: `[event.table]` (lists) and `[event.table, row.id]`. */
  queryKeys?: (event: EventMessage) => QueryKey[];
  /** New data for a touched query, or `undefined` to invalidate it instead. Default: lists of
   * rows (arrays) are patched with {@link patchList}; single rows are replaced or removed. */
  patch?: (event: EventMessage, queryKey: QueryKey, data: unknown) => unknown;
  /** What `resync` invalidates. Default: every query (the room's data may be anywhere). */
  resyncKeys?: QueryKey[];
  /** The primary key column (default `id`). */
  idKey?: string;
}

/** Applies an event to a list of rows: INSERT adds, UPDATE replaces, DELETE removes, by id. */
export function patchList<T extends Record<string, unknown>>(rows: readonly T[], event: EventMessage, idKey = "id"): T[] {
  const id = event.row[idKey];
  const rest = rows.filter((r) => r[idKey] !== id);
  if (event.op === "DELETE") return rest;
  const row = event.row as T;
  const at = rows.findIndex((r) => r[idKey] === id);
  if (at < 0) return [...rest, row];
  const next = rows.slice();
  next[at] = { ...rows[at], ...row };
  return next;
}

function defaultPatch(event: EventMessage, _key: QueryKey, data: unknown, idKey: string): unknown {
  if (event.truncated) return undefined; // only the primary key came: refetch
  if (data === undefined) return undefined;
  if (Array.isArray(data)) return patchList(data, event, idKey);
  if (event.op === "DELETE") return undefined;
  return { ...(data as object), ...event.row };
}

/** Keeps `queryClient` in step with `room`; returns a function that stops it. */
export function syncQueries(queryClient: QueryClientLike, room: Room, options: SyncOptions = {}): () => void {
  const idKey = options.idKey ?? "id";
  const keysOf =
    options.queryKeys ?? ((e: EventMessage) => [[e.table], [e.table, e.row[idKey]]] as QueryKey[]);
  const offEvent = room.on("event", (event: EventMessage) => {
    for (const key of keysOf(event)) {
      const data = queryClient.getQueryData(key);
      const next = options.patch ? options.patch(event, key, data) : defaultPatch(event, key, data, idKey);
      if (next === undefined) void queryClient.invalidateQueries({ queryKey: key });
      else queryClient.setQueryData(key, () => next);
    }
  });
  const offResync = room.on("resync", () => {
    for (const key of options.resyncKeys ?? [[]]) void queryClient.invalidateQueries({ queryKey: key });
  });
  return () => {
    offEvent();
    offResync();
  };
}
