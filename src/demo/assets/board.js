// The live board: a project's tasks in columns, kept live by pgrelay-client.
// Query parameters: user=u1 (skip the picker), project=1, relay=<relay URL> (default: this page's
// origin), api=<demo endpoints URL> (default: relay), transports=sse, ttl=<token seconds>.
import { createClient } from "./pgrelay-client.js";

const params = new URLSearchParams(location.search);
const relay = params.get("relay") ?? location.origin;
const api = params.get("api") ?? relay;
const transports = params.get("transports") ? params.get("transports").split(",") : undefined;
const ttl = params.get("ttl");
const COLORS = ["#e74c3c", "#3d7be0", "#2e9d5b", "#8e44ad", "#d35400", "#16a085"];
const $ = (sel) => document.querySelector(sel);

const board = {
  client: null,
  user: null,
  project: null,
  tasks: new Map(),
  comments: new Map(),
  names: {},
  room: null,
  taskRoom: null,
  openTask: null,
  loaded: 0,
  /** The cards as shown: what tests compare with the database. */
  state() {
    return [...this.tasks.values()]
      .map((t) => ({ id: t.id, status: t.status, title: t.title, is_private: t.is_private }))
      .sort((a, b) => a.id - b.id);
  },
};
window.pgrelayBoard = board;

async function users() {
  const response = await fetch(`${api}/demo/users${ttl ? `?ttl=${ttl}` : ""}`, { cache: "no-store" });
  if (!response.ok) throw new Error(`/demo/users: HTTP ${response.status}`);
  return (await response.json()).users;
}

async function pickUser() {
  const list = await users();
  const picker = $("#users");
  picker.replaceChildren(
    ...list.map((u) => {
      const b = document.createElement("button");
      b.dataset.user = u.id;
      b.innerHTML = `<strong></strong><small></small>`;
      b.querySelector("strong").textContent = `${u.name} (${u.id})`;
      b.querySelector("small").textContent = u.note;
      b.onclick = () => {
        const url = new URL(location.href);
        url.searchParams.set("user", u.id);
        history.replaceState(null, "", url);
        start(u.id);
      };
      return b;
    }),
  );
  if (params.get("user")) start(params.get("user"));
}

function start(userId) {
  if (board.client) board.client.close();
  board.user = userId;
  $("#users").hidden = true;
  $("#board").hidden = false;
  // The token function is called to connect, ahead of expiry and after a 4001: a fresh token each time.
  const token = async () => (await users()).find((u) => u.id === userId).token;
  board.client = createClient(relay, { token, ...(transports ? { transports } : {}) });
  board.client.on("status", renderStatus);
  renderStatus(board.client.status);
  load(params.get("project"));
}

async function load(project) {
  const token = await (await users()).find((u) => u.id === board.user).token;
  const q = new URLSearchParams({ token });
  if (project) q.set("project", project);
  const response = await fetch(`${api}/demo/board?${q}`, { cache: "no-store" });
  const data = await response.json();
  board.names = data.names;
  $("#me").textContent = `signed in as ${data.names[board.user] ?? board.user}`;
  board.tasks = new Map(data.tasks.map((t) => [t.id, t]));
  board.comments = new Map(data.comments.map((c) => [c.id, c]));
  renderProjects(data.projects, data.project);
  render();
  if (board.room && board.project === data.project) return; // a refetch after resync
  board.room?.leave();
  board.project = data.project;
  if (data.project === null) return;
  // Joined at the position the data was read at: every change after it arrives, none is missed.
  const room = board.client.join(`project:${data.project}`, { since: data.position });
  board.room = room;
  room.on("event", apply);
  room.on("resync", () => load(String(board.project)));
  room.on("presence", renderPresence);
  room.setPresence({ name: board.names[board.user] ?? board.user });
  await room.ready;
  board.loaded++;
}

function apply(event) {
  const id = event.row.id;
  if (event.table === "tasks") {
    if (event.op === "DELETE") board.tasks.delete(id);
    else board.tasks.set(id, { ...board.tasks.get(id), ...event.row });
    render(id);
  } else if (event.table === "comments") {
    if (event.op === "DELETE") board.comments.delete(id);
    else board.comments.set(id, { ...board.comments.get(id), ...event.row });
    renderComments();
  }
}

function render(fresh) {
  for (const column of document.querySelectorAll("[data-column]")) {
    const list = column.querySelector("ul");
    const cards = [...board.tasks.values()]
      .filter((t) => t.status === column.dataset.column)
      .sort((a, b) => a.id - b.id)
      .map((t) => card(t, t.id === fresh));
    list.replaceChildren(...cards);
  }
  if (board.openTask !== null && !board.tasks.has(board.openTask)) closeTask();
}

function card(task, fresh) {
  const li = document.createElement("li");
  li.className = `card${task.is_private ? " private" : ""}${fresh ? " fresh" : ""}`;
  li.dataset.task = task.id;
  li.innerHTML = `<div class="title"></div><div class="meta"></div>`;
  li.querySelector(".title").textContent = task.title;
  const comments = [...board.comments.values()].filter((c) => c.task_id === task.id).length;
  li.querySelector(".meta").textContent =
    `#${task.id} · ${board.names[task.assignee_id] ?? "unassigned"}${comments ? ` · ${comments} comment${comments > 1 ? "s" : ""}` : ""}`;
  li.onclick = () => openTask(task.id);
  if (fresh) setTimeout(() => li.classList.remove("fresh"), 1200);
  return li;
}

function openTask(id) {
  if (board.openTask === id) return;
  closeTask();
  board.openTask = id;
  $("#task").hidden = false;
  $("#task-title").textContent = board.tasks.get(id)?.title ?? "";
  board.taskRoom = board.client.join(`task:${id}`);
  board.taskRoom.on("typing", ({ users }) => {
    $("#typing").textContent = users.length ? `${users.map((u) => board.names[u] ?? u).join(", ")} typing…` : "";
  });
  renderComments();
}

function closeTask() {
  board.taskRoom?.leave();
  board.taskRoom = null;
  board.openTask = null;
  $("#task").hidden = true;
  $("#typing").textContent = "";
}

function renderComments() {
  const list = $("#comments");
  const comments = [...board.comments.values()].filter((c) => c.task_id === board.openTask).sort((a, b) => a.id - b.id);
  list.replaceChildren(
    ...comments.map((c) => {
      const li = document.createElement("li");
      li.textContent = `${board.names[c.author_id] ?? c.author_id}: ${c.body}`;
      return li;
    }),
  );
  render();
}

function renderProjects(projects, current) {
  $("#projects").replaceChildren(
    ...projects.map((p) => {
      const b = document.createElement("button");
      b.textContent = p.name;
      b.setAttribute("aria-current", String(p.id === current));
      b.onclick = () => {
        board.room?.leave();
        board.room = null;
        closeTask();
        load(String(p.id));
      };
      return b;
    }),
  );
}

function renderPresence(users) {
  $("#presence").replaceChildren(
    ...Object.keys(users)
      .sort()
      .map((id, i) => {
        const a = document.createElement("span");
        a.className = "avatar";
        a.dataset.user = id;
        a.title = board.names[id] ?? id;
        a.style.background = COLORS[Number(id.replace(/\D/g, "")) % COLORS.length || i];
        a.textContent = (board.names[id] ?? id).slice(0, 1).toUpperCase();
        return a;
      }),
  );
}

function renderStatus(status) {
  const badge = $("#status");
  badge.dataset.status = status;
  badge.dataset.transport = board.client?.transport ?? "";
  badge.textContent = status === "open" ? `live · ${board.client.transport}` : status;
}

$("#close").onclick = closeTask;
$("#comment").addEventListener("input", () => board.taskRoom?.typing(true));
pickUser().catch((err) => {
  $("#users").textContent = `Cannot reach the relay's demo endpoints: ${err.message}`;
});
