// The console's only script besides htmx (CSP: scripts from this origin only, none inline).
document.addEventListener("DOMContentLoaded", () => {
  // A safety concern shows the crisis resources the moment the box is ticked, before
  // anything is sent, and whatever happens to the request.
  for (const box of document.querySelectorAll("input[data-shows]")) {
    const target = document.getElementById(box.dataset.shows);
    const update = () => { if (box.checked) { target.hidden = false; } };
    box.addEventListener("change", update);
    update();
  }
  // The alert inbox listens for new alerts and reloads its list (with the user's own
  // session: what it shows is scoped by the notifications service).
  const list = document.querySelector("[data-live]");
  if (list) {
    const source = new EventSource(list.dataset.live);
    source.addEventListener("alert", () => htmx.trigger(list, "refresh"));
  }
});
