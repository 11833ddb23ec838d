-- Demo data for the README walkthrough, loaded once into a new embedded database.
--
--   alice (u1)  owner of project 1 "Launch"
--   bob   (u2)  member of project 1
--   carol (u3)  viewer of project 1, owner of project 2 "Hiring"
--   dave  (u4)  in no project: sees nothing
--
-- Task 3 is private to alice (its creator); bob and carol do not see it.

INSERT INTO users (id, name) VALUES
    ('u1', 'alice'), ('u2', 'bob'), ('u3', 'carol'), ('u4', 'dave')
ON CONFLICT DO NOTHING;

INSERT INTO projects (id, name, owner_id) VALUES (1, 'Launch', 'u1'), (2, 'Hiring', 'u3')
ON CONFLICT DO NOTHING;
SELECT setval(pg_get_serial_sequence('projects', 'id'), (SELECT max(id) FROM projects));

INSERT INTO project_members (project_id, user_id, role) VALUES
    (1, 'u1', 'owner'), (1, 'u2', 'member'), (1, 'u3', 'viewer'), (2, 'u3', 'owner')
ON CONFLICT DO NOTHING;

INSERT INTO tasks (id, project_id, title, status, assignee_id, created_by, is_private) VALUES
    (1, 1, 'Write the announcement', 'todo', 'u2', 'u1', false),
    (2, 1, 'Book the venue', 'doing', 'u1', 'u1', false),
    (3, 1, 'Negotiate the sponsor deal', 'todo', 'u1', 'u1', true),
    (4, 2, 'Interview candidates', 'todo', 'u3', 'u3', false)
ON CONFLICT DO NOTHING;
SELECT setval(pg_get_serial_sequence('tasks', 'id'), (SELECT max(id) FROM tasks));

INSERT INTO comments (id, task_id, project_id, author_id, body) VALUES
    (1, 1, 1, 'u1', 'Draft due Friday')
ON CONFLICT DO NOTHING;
SELECT setval(pg_get_serial_sequence('comments', 'id'), (SELECT max(id) FROM comments));
