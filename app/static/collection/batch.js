// The batch page: replacing a draft's prompts deletes them, so the upload asks first.
document.querySelectorAll("[data-testid=upload-form]").forEach((form) => {
  form.addEventListener("submit", (event) => {
    const replace = form.querySelector("input[name=replace]");
    if (replace && replace.checked && !window.confirm(replace.dataset.confirm)) {
      event.preventDefault();
    }
  });
});
