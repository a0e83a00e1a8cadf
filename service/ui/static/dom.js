// Building the page from data: every value goes in as text (textContent, text nodes, dataset, title), never as
// markup, so a model name or client id of <script>…</script> shows as those characters.

// Characters that would make a name read as another: bidi overrides and isolates (U+202E turns "gnp.exe" into
// "exe.png"), marks, other controls but tab. Shown as their code (\u202e), so what is read is what the name is.
const DECEPTIVE = /[\u0000-\u0008\u000a-\u001f\u007f-\u009f\u061c\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]/g;

// The text as it is safe to show: every deceptive character written out as its code.
export function shown(text) {
  return String(text).replace(DECEPTIVE, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`);
}

// An element with the given class (optional) and children: nodes, or strings, which append() makes text nodes.
export function el(tag, className, ...children) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

// A name or path that may be very long: cut with an ellipsis by the style sheet, the whole of it in its title.
export function longText(text, className = "name") {
  const node = el("span", `long ${className}`, shown(text));
  node.title = shown(text);
  return node;
}

// A number for a table cell, or an em dash when there is none.
export function num(value) {
  return value === null || value === undefined ? "—" : Number(value).toLocaleString("en");
}

// Text only screen readers hear (a button's model name, which sighted users read from its row).
export function hidden(text) {
  return el("span", "visually-hidden", text);
}

// A button carrying its action and a key that survives the table's rebuild (to keep keyboard focus on it).
export function actionButton(label, action, key, spoken) {
  const button = el("button", null, label, spoken === undefined ? null : hidden(` ${shown(spoken)}`));
  button.type = "button";
  button.dataset.action = action;
  button.dataset.key = `${action}\u0000${key}`;
  return button;
}

// Replace a table body's rows, keeping keyboard focus on the same button (by its data-key) across the refresh.
// Each cell gets its column's heading as data-label: at phone width the rows are cards that show it.
export function replaceRows(tbody, rows) {
  const focused = document.activeElement;
  const key = focused && tbody.contains(focused) ? focused.dataset.key : undefined;
  const labels = [...tbody.closest("table").tHead.rows[0].cells].map((th) => th.textContent.trim());
  for (const tr of rows) [...tr.cells].forEach((td, i) => { td.dataset.label = labels[i] || ""; });
  tbody.replaceChildren(...rows);
  if (key === undefined) return;
  for (const button of tbody.querySelectorAll("button")) {
    if (button.dataset.key === key && !button.disabled) {
      button.focus();
      return;
    }
  }
}

// A row of cells; a string or node each.
export function row(cells, className) {
  return el("tr", className, ...cells.map((cell) => el("td", null, cell)));
}
