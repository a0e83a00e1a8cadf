// Building the page from data: every value goes in as text (textContent, text nodes, dataset), never as markup,
// so a model name or client id of <script>…</script> shows as those characters.

// An element with the given class (optional) and children: nodes, or strings, which append() makes text nodes.
export function el(tag, className, ...children) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  node.append(...children.filter((child) => child !== null && child !== undefined));
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

// Replace a table body's rows, keeping keyboard focus on the same button (by its data-key) across the refresh.
export function replaceRows(tbody, rows) {
  const focused = document.activeElement;
  const key = focused && tbody.contains(focused) ? focused.dataset.key : undefined;
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
